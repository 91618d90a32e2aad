"""Many clients against an engine whose models run in other processes (the Ray and the
process engine's tests): each client's request scales the residual after block 0 by its own
factor, so each answer depends on its own request, checked against local TL."""
from __future__ import annotations

import json
import threading
import time
import urllib.request

import pytest
import torch
from torch.testing import assert_close

from graphs import graph, node, ref
from hookwire.client import Connection
from hookwire.errors import Cancelled, ReplicaLost
from hookwire.protocol import Progress

def health(server) -> dict:
    with urllib.request.urlopen(server.url.replace("ws://", "http://") + "/health",
                                timeout=10) as resp:
        return json.loads(resp.read())


SITE = "blocks.0.hook_resid_post"


def scaled_graph(k: int) -> dict:
    """Scale the residual stream after block 0 by a per-request factor, save it, return
    logits: each client's answer depends on its own request."""
    return graph(sites=[SITE], saves={"resid": 1},
                 nodes=[node(0, "site.read", 0), node(1, "mul", ref(0), 0.5 + 0.1 * k),
                        node(2, "site.write", 0, ref(1), mode="replace")])


def expected_scaled(local, tokens, k):
    seen: dict = {}

    def hook(act, hook):
        seen["resid"] = act * (0.5 + 0.1 * k)
        return seen["resid"]

    logits = local.run_with_hooks(tokens, fwd_hooks=[(SITE, hook)])
    return logits, seen["resid"]


def run_clients(url, n_clients, per_client, tokens, after_each=None) -> list:
    """``n_clients`` threads, each with its own connection (its own user on the server),
    sending ``per_client`` requests one after another. Returns ``(k, values)`` per answer
    in the order they came, ``values`` being the ReplicaLost error a request ended with where
    it did; ``after_each(results)`` is called (under a lock) after each one arrives."""
    errors: list = []
    results: list = []
    lock = threading.Lock()

    def on_result(k, values):
        with lock:
            results.append((k, values))
            if after_each is not None:
                after_each(results)

    def client(c):
        conn = None
        try:
            conn = Connection(url)
            for i in range(per_client):
                k = (c * per_client + i) % 7
                try:
                    on_result(k, conn.run(scaled_graph(k), {"input_ids": tokens}).values)
                except ReplicaLost as exc:  # typed, retryable: allowed while a replica dies
                    on_result(k, exc)
        except BaseException as exc:  # anything else fails the test
            errors.append(exc)
        finally:
            if conn is not None:
                conn.close()

    threads = [threading.Thread(target=client, args=(c,), name=f"test-client-{c}")
               for c in range(n_clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not any(t.is_alive() for t in threads), "a client hung: an accepted request was lost"
    assert not errors, errors
    return results


def check_scaled(values, local, tokens, k):
    logits, resid = expected_scaled(local, tokens, k)
    assert_close(values["resid"], resid)
    assert_close(values["__logits__"], logits)


def check_cancel_while_running(server, local_models, remote_models) -> None:
    """A cancel that arrives while the model's process is running the request: the client
    gets Cancelled, the engine holds nothing for it afterwards, the connection keeps
    serving (equal to local TL)."""
    local, remote = local_models["tiny-gpt2"], remote_models["tiny-gpt2"]
    tokens = local.to_tokens(["hello world"])
    gate = torch.randn(64, 64)

    def slow(act, hook):
        x = act
        for _ in range(20000):  # seconds of real matmuls over there
            x = torch.tanh(x @ gate)
        return act + 0 * x

    run = remote.run_with_hooks(tokens, fwd_hooks=[("blocks.0.hook_resid_pre", slow)],
                                blocking=False)
    for event in run.events():
        if isinstance(event, Progress) and event.stage in ("started", "site"):
            run.cancel()  # it has started over there
            break
    with pytest.raises(Cancelled):
        run.result(timeout=120)
    assert_close(remote.run_with_hooks(tokens, fwd_hooks=[]), local(tokens))
    deadline = time.monotonic() + 30
    while server.server.worker.queue_depth() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert server.server.worker.queue_depth() == 0
