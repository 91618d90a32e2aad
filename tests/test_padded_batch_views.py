"""A request right-padded beside a longer batch mate reads its rows of each site as a view of
the padded batch, strided otherwise than its activation is when it runs alone. An op bound to
strides then fails where solo it runs: ``x.view(-1)`` (merging batch and positions) raised
("view size is not compatible with input tensor's size and stride") the moment a co-tenant
with a longer prompt shared the forward. Such a member now runs again alone, at its own
length (``ModelWorker._run_unpadded``), and gets its solo answer; views that padding leaves
possible (splitting a dim, as TL's head sites do) still share the forward."""
from __future__ import annotations

import pytest
import torch

import hookwire.server as hs
from hookwire.server.worker import ModelWorker

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


@pytest.fixture
def reruns(monkeypatch) -> list:
    """The members run again alone after failing while right-padded."""
    runs: list = []
    run_unpadded = ModelWorker._run_unpadded

    def counted(self, p):
        runs.append(p.job.request_id)
        return run_unpadded(self, p)
    monkeypatch.setattr(ModelWorker, "_run_unpadded", counted)
    return runs


def _tokens(batch: int, seq: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 200, (batch, seq), generator=torch.Generator().manual_seed(seed))


def _solo(srv, g: dict):
    client = PipelinedClient(srv.url, VIEWER_KEY)
    try:
        rid = client.send(g, {"input_ids": _tokens(2, 5, 1)})
        return client.collect([rid])[rid]
    finally:
        client.close()


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


def _viewing(model: str, *shape) -> dict:
    return graph(model, nodes=[node(0, "site.read", 0), node(1, "view", ref(0), *shape),
                               node(2, "mul", ref(1), -3.0)],
                 sites=[SITE], saves={"viewed": 2})


@pytest.mark.parametrize("model", ["tiny-gpt2", "tiny-llama"])
def test_a_member_whose_view_fails_padded_runs_again_alone(pair_server, model, reruns):
    flat = _viewing(model, -1)
    solo = _solo(pair_server, flat)
    assert solo.error is None and solo.values["viewed"].shape == (2 * 5 * 64,)
    answers = _beside_a_longer_mate(pair_server, model, flat)
    for answer in answers:
        assert answer.error is None, answer.error
        assert equal_values(answer.values, solo.values)
    assert reruns, "the member never shared a padded forward"  # (and failed there)


@pytest.mark.parametrize("model", ["tiny-gpt2", "tiny-llama"])
def test_views_that_padding_allows_still_share_the_forward(pair_server, model, reruns):
    split = _viewing(model, 2, 5, 4, 16)  # (heads split out, as TL's hook_z conversion does)
    solo = _solo(pair_server, split)
    assert solo.error is None
    answers = _beside_a_longer_mate(pair_server, model, split)
    assert any(a.batch_size == 2 for a in answers)
    for answer in answers:
        assert answer.error is None, answer.error
        assert equal_values(answer.values, solo.values)
    assert not reruns
