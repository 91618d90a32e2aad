"""Many clients against an engine whose models run in other processes (the Ray and the
process engine's tests): each client's request scales the residual after block 0 by its own
factor, so each answer depends on its own request, checked against local TL."""
from __future__ import annotations

import json
import threading
import urllib.request

from torch.testing import assert_close

from graphs import graph, node, ref
from hookwire.client import Connection
from hookwire.errors import ReplicaLost

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


def run_clients(url, n_clients, per_client, tokens, on_result):
    """``n_clients`` threads, each with its own connection (its own user on the server),
    sending ``per_client`` requests one after another. ``on_result(k, values)`` gets each
    answer, or the ReplicaLost error a request ended with."""
    errors: list = []

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


def check_scaled(values, local, tokens, k):
    logits, resid = expected_scaled(local, tokens, k)
    assert_close(values["resid"], resid)
    assert_close(values["__logits__"], logits)
