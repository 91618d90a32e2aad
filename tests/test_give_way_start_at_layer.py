"""A forward that starts at a block (``start_at_layer``) gives way between its blocks like any
forward (``ModelWorker._forward_may_give_way`` does not look at it), but TL's bridge arms the
injection of its residual on the model itself: ``TransformerBridge._setup_start_at_layer``
sets ``_start_at_layer_idx`` and ``_start_residual`` on *every* block for the duration of the
forward. A light request of another user run nested in it (server/give_way.py) then has its
block-k input replaced by the outer request's residual: the nested user's results are the
outer user's data run through the rest of the model."""
from __future__ import annotations


import graphs
import torch
from graphs import graph
from nested_runs import held_beside

import hookwire.server as hs
from hookwire.validate import Limits

import pytest


@pytest.fixture
def server(hosted):
    srv = hs.start(models={"tiny-gpt2": hosted["tiny-gpt2"].bridge}, port=0,
                   limits=Limits(max_request_seconds=120))
    yield srv
    srv.stop()


def start_at_layer_graph(k: int) -> dict:
    g = graph(nodes=[], inputs={"input_ids": "input_ids", "residual": "residual"})
    g["forward"]["start_at_layer"] = k
    return g


def test_a_light_request_nested_in_a_start_at_layer_forward_is_its_own(server, hosted):
    """User A's forward starts at block 1 from A's residual (1 x 8); it is held at its first
    block until user B's light 1 x 8 read of ``blocks.1.hook_resid_pre`` queues, then goes
    on past the give-way quantum, so B's request runs nested in it. B's logits and read must
    equal its solo run (before the fix: B reads A's residual, bit-equal, and gets A's logits)."""
    bridge = hosted["tiny-gpt2"].bridge
    gen = torch.Generator().manual_seed(17)
    tokens_a = torch.randint(0, 256, (1, 8), generator=gen)
    tokens_b = torch.randint(0, 256, (1, 8), generator=gen)
    residual_a = torch.randn(1, 8, bridge.cfg.d_model, generator=gen)
    with torch.no_grad():
        solo_b = bridge(tokens_b)
        a_local = bridge(residual_a, start_at_layer=1)
        b_from_a = bridge(residual_a, start_at_layer=1)  # A's residual through block 1 on

    read_b = graphs.read_graph(sites=["blocks.1.hook_resid_pre"], names=["resid"])
    with torch.no_grad():
        solo_resid_b = bridge.run_with_cache(tokens_b)[1]["blocks.1.hook_resid_pre"]
    results = held_beside(server, bridge.blocks[0], start_at_layer_graph(1),
                          {"input_ids": tokens_a, "residual": residual_a},
                          read_b, {"input_ids": tokens_b})
    got_b, got_resid = results["b"].values["__logits__"], results["b"].values["resid"]
    assert not torch.equal(got_resid, residual_a), \
        "B's read of blocks.1.hook_resid_pre is A's residual, bit-equal (and B's logits are " \
        f"A's residual run from block 1: {torch.equal(got_b, b_from_a)})"
    torch.testing.assert_close(got_resid, solo_resid_b, rtol=0, atol=0)
    torch.testing.assert_close(got_b, solo_b, rtol=0, atol=0)
    torch.testing.assert_close(results["a"].values["__logits__"], a_local)

def test_a_start_at_layer_forward_keeps_its_residual_while_another_runs_nested(server,
                                                                             hosted):
    """The other way round: A's forward starts at block 1 from A's residual; user B's light
    request, run nested in it, starts at block 1 too (one token-sized upload: it looks
    light). B's forward sets up and then *clears* the injection state on every block
    (``_teardown_start_at_layer``), so A's block 1 no longer swaps A's residual in: A's
    logits must still equal local TL's."""
    bridge = hosted["tiny-gpt2"].bridge
    gen = torch.Generator().manual_seed(18)
    tokens = torch.randint(0, 256, (1, 8), generator=gen)
    residual_a = torch.randn(1, 8, bridge.cfg.d_model, generator=gen)
    residual_b = torch.randn(1, 8, bridge.cfg.d_model, generator=gen)
    with torch.no_grad():
        a_local = bridge(residual_a, start_at_layer=1)
        b_local = bridge(residual_b, start_at_layer=1)
    results = held_beside(server, bridge.blocks[0], start_at_layer_graph(1),
                          {"input_ids": tokens, "residual": residual_a},
                          start_at_layer_graph(1),
                          {"input_ids": tokens, "residual": residual_b})
    torch.testing.assert_close(results["b"].values["__logits__"], b_local, rtol=0, atol=0)
    torch.testing.assert_close(results["a"].values["__logits__"], a_local, rtol=0, atol=0)
