"""A request right-padded beside a longer batch mate reads its rows of each site as a view of
the padded batch, strided otherwise than its activation is when it runs alone. Ops that depend
on strides then behave otherwise than solo: ``x.view(-1)``, which runs solo, raised ("view size
is not compatible with input tensor's size and stride") the moment a co-tenant with a longer
prompt shared the forward. Such a request now shares a forward only at its own length."""
from __future__ import annotations

import pytest
import torch

import hookwire.server as hs

from graphs import graph, node, read_graph, ref
from pipelined import PipelinedClient, equal_values

VIEWER_KEY, MATE_KEY = "viewer-key-0123456789abcdef", "mate-key-0123456789abcdef"
SITE = "blocks.0.hook_resid_pre"


@pytest.fixture(scope="module")
def pair_server(hosted):
    srv = hs.start(models={n: h.bridge for n, h in hosted.items()}, port=0,
                   api_keys=[VIEWER_KEY, MATE_KEY], batch_window_s=0.05)
    yield srv
    srv.stop()


def _tokens(batch: int, seq: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 200, (batch, seq), generator=torch.Generator().manual_seed(seed))


def _beside_a_longer_mate(srv, model: str, g: dict, tries: int = 5) -> list:
    """``g`` on 2 x 5 tokens sent back to back with a 1 x 9 reader, ``tries`` times: the
    answers to ``g``."""
    short, long = _tokens(2, 5, 1), _tokens(1, 9, 2)
    member, mate = PipelinedClient(srv.url, VIEWER_KEY), PipelinedClient(srv.url, MATE_KEY)
    try:
        answers = []
        for _ in range(tries):
            a = member.send(g, {"input_ids": short})
            b = mate.send(read_graph(model, [SITE]), {"input_ids": long})
            answers.append(member.collect([a])[a])
            assert mate.collect([b])[b].error is None
        return answers
    finally:
        member.close()
        mate.close()


@pytest.mark.parametrize("model", ["tiny-gpt2", "tiny-llama"])
def test_a_member_that_views_its_rows_runs_as_solo_beside_a_longer_mate(pair_server, model):
    plain = graph(model, nodes=[node(0, "site.read", 0), node(1, "mul", ref(0), -3.0)],
                  sites=[SITE], saves={"x": 1})
    viewer = graph(model, nodes=[node(0, "site.read", 0), node(1, "view", ref(0), -1),
                                 node(2, "mul", ref(1), -3.0)],
                   sites=[SITE], saves={"flat": 2})
    # The setting does pad: a member without views shares the longer mate's forward.
    assert any(a.batch_size == 2 for a in _beside_a_longer_mate(pair_server, model, plain))
    solo_client = PipelinedClient(pair_server.url, VIEWER_KEY)
    try:
        rid = solo_client.send(viewer, {"input_ids": _tokens(2, 5, 1)})
        solo = solo_client.collect([rid])[rid]
    finally:
        solo_client.close()
    assert solo.error is None and solo.values["flat"].shape == (2 * 5 * 64,)
    for answer in _beside_a_longer_mate(pair_server, model, viewer):
        assert answer.error is None, answer.error
        assert answer.batch_size == 1  # never padded: it ran at its own length
        assert equal_values(answer.values, solo.values)
