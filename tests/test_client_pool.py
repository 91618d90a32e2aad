"""The client's connection pool under overlapping calls (issue 18): past ``POOL_SIZE`` calls in
flight, each waits for whichever connection frees first -- not for the pool's first one --
and a ``blocking=False`` call returns once traced even while every connection is busy.

A connection is made busy by holding its lock from the test, as a long request on it would:
the server, the connections and the TL objects are real."""
from __future__ import annotations

import threading

import pytest
from torch.testing import assert_close

import hookwire
import hookwire.client as client
import hookwire.transformerlens as htl

NAME = "tiny-gpt2"


@pytest.fixture
def pool_of_two(server, monkeypatch):
    """A fresh pool of at most two connections to ``server``, closed afterwards."""
    client.close_connections()
    monkeypatch.setattr(client, "POOL_SIZE", 2)
    yield
    client.close_connections()


def _ablate(head):
    def hook(z, hook):
        z[:, :, head, :] = 0.0
    return hook


def test_overlapping_calls_past_the_pool_take_the_connection_that_frees(
        server, local_models, pool_of_two):
    local = local_models[NAME]
    model = htl.RemoteModel(NAME, url=server.url)
    tokens = local.to_tokens("The cat sat on the mat")
    model.run_with_hooks(tokens)  # the model's description is cached from here on
    busy = client.get_connection(server.url)
    spare = client.get_connection(server.url) if busy.lock.locked() else None
    busy.lock.acquire()  # as a long request on the pool's first connection would
    try:
        if spare is None:
            spare = client.get_connection(server.url)
        assert spare is not busy
        hooks = [("blocks.1.attn.hook_z", _ablate(h % 4)) for h in range(5)]
        # Five calls in flight on a pool of two whose first connection stays busy: each
        # must run on the other one. (Before, every call past the pool's size waited for the
        # first connection, and this gather timed out.)
        runs = [model.run_with_hooks(tokens, fwd_hooks=[hook], blocking=False)
                for hook in hooks]
        results = hookwire.gather(runs, timeout=120)
        assert all(run._conn is spare for run in runs)
    finally:
        busy.lock.release()
    for hook, got in zip(hooks, results):
        assert_close(got, local.run_with_hooks(tokens, fwd_hooks=[hook]), rtol=0, atol=0)


def test_a_non_blocking_call_returns_while_every_connection_is_busy(
        server, local_models, pool_of_two):
    local = local_models[NAME]
    model = htl.RemoteModel(NAME, url=server.url)
    tokens = local.to_tokens("The dog sat on the rug")
    model.run_with_hooks(tokens)
    first = client.get_connection(server.url)
    first.lock.acquire()
    second = client.get_connection(server.url)
    second.lock.acquire()
    held = [first, second]
    hook = ("blocks.0.hook_resid_post", lambda act, hook: act * 2)
    started: list = []
    try:
        caller = threading.Thread(target=lambda: started.append(
            model.run_with_hooks(tokens, fwd_hooks=[hook], blocking=False)))
        caller.start()
        caller.join(60)
        # The call came back as soon as its hooks were traced; its request waits for a
        # connection (before, tracing itself waited for the first connection's lock).
        assert not caller.is_alive() and len(started) == 1
        run = started[0]
        assert not run.done()
        second.lock.release()
        held.remove(second)
        got = run.result(timeout=120)
        assert run._conn is second
    finally:
        for conn in held:
            conn.lock.release()
    assert_close(got, local.run_with_hooks(tokens, fwd_hooks=[hook]), rtol=0, atol=0)
