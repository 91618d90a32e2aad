"""What the model worker hands the front's event loop (server/handoff.py, used by
server/app.py's ``ConnState``): a forward's values and progress may wait a moment to travel
together -- each wake-up of the loop costs the worker the GIL -- but a long forward's values
still stream while it runs, and every value arrives, equal to local TL."""
from __future__ import annotations

import threading
import time

import graphs
import pytest
import torch

import hookwire.server as hs
from hookwire.client import Connection
from hookwire.server import handoff

SITES = ["blocks.0.hook_resid_post", "blocks.1.ln1.hook_normalized", "blocks.1.hook_resid_post"]


@pytest.fixture
def server(hosted):
    srv = hs.start(models={"tiny-gpt2": hosted["tiny-gpt2"].bridge}, port=0)
    yield srv
    srv.stop()


def local_reads(bridge, tokens):
    seen = {}
    with torch.no_grad():
        logits = bridge.run_with_hooks(tokens, fwd_hooks=[
            (name, lambda act, hook, name=name: seen.__setitem__(name, act.clone()))
            for name in SITES])
    return logits, seen


def only_connection(server):
    (state,) = list(server.server.states)
    return state


def test_a_small_requests_messages_wake_the_loop_once(server, hosted, monkeypatch):
    """With the hand-off delay longer than the request, its "started" and site progress, its
    three saved values, its logits and its ``done`` reach the loop in one hand-off; with no
    delay (each handed over at once, the loop woken as often as it keeps up) the same values;
    every value equal to local TL."""
    tokens = torch.randint(0, 256, (2, 7), generator=torch.Generator().manual_seed(0))
    logits, seen = local_reads(hosted["tiny-gpt2"].bridge, tokens)
    conn = Connection(server.url)
    try:
        for delay, most in ((60.0, 1), (0.0, None)):  # (how often, with no delay: timing)
            monkeypatch.setattr(handoff, "HANDOFF_DELAY_S", delay)
            events: list = []
            before = only_connection(server).handoffs if server.server.states else 0
            result = conn.run(graphs.read_graph(sites=SITES), {"input_ids": tokens},
                              on_event=events.append)
            woken = only_connection(server).handoffs - before
            if most is not None:
                assert woken == most, woken
            assert any(getattr(e, "stage", None) == "site" for e in events)
            torch.testing.assert_close(result.values["__logits__"], logits, rtol=0, atol=0)
            for name in SITES:
                torch.testing.assert_close(result.values[name], seen[name], rtol=0, atol=0)
    finally:
        conn.close()


def test_a_forwards_values_still_stream_while_it_runs(server, hosted):
    """A value saved in block 0 (under ``HANDOFF_BYTES``) reaches the client while the
    forward's last block still runs -- once ``HANDOFF_DELAY_S`` has passed, at the block's
    stop check -- not with what comes after the blocks; every value equal to local TL. (Plain
    torch hooks on the last block: one waits out the delay as it starts, one waits there for
    the value to arrive as it ends.)"""
    bridge = hosted["tiny-gpt2"].bridge
    tokens = torch.randint(0, 256, (2, 256), generator=torch.Generator().manual_seed(1))
    early, late = "blocks.0.hook_resid_post", "ln_final.hook_normalized"
    assert tokens.numel() * bridge.cfg.d_model * 4 < handoff.HANDOFF_BYTES
    seen = {}
    with torch.no_grad():
        logits = bridge.run_with_hooks(tokens, fwd_hooks=[
            (name, lambda act, hook, name=name: seen.__setitem__(name, act.clone()))
            for name in (early, late)])
    arrived, streamed = threading.Event(), []

    def last_block_starts(module, args):
        time.sleep(2 * handoff.HANDOFF_DELAY_S)

    def last_block_ends(module, args, output):
        streamed.append(arrived.wait(30))

    def on_value(name, value):
        if name == early:
            arrived.set()

    handles = [bridge.blocks[-1].register_forward_pre_hook(last_block_starts),
               bridge.blocks[-1].register_forward_hook(last_block_ends)]
    conn = Connection(server.url)
    try:
        result = conn.run(graphs.read_graph(sites=[early, late]), {"input_ids": tokens},
                          on_value=on_value)
    finally:
        for handle in handles:
            handle.remove()
        conn.close()
    assert streamed == [True]
    torch.testing.assert_close(result.values["__logits__"], logits)
    for name in (early, late):
        torch.testing.assert_close(result.values[name], seen[name])
