"""A long request gives way to light ones of other users waiting behind it (server/give_way.py):
they run at its yield points (its validation, the nodes after its forward), and every result
is still what it is when each runs alone."""
from __future__ import annotations

import threading
import time

import graphs
import pytest
import torch
from graphs import const, graph, node, ref

import hookwire.server as hs
from hookwire.client import Connection
from hookwire.validate import Limits

SITE = "blocks.0.hook_resid_post"
CHAIN = 400  # matmuls of 256 x 256 after the forward: long next to a tiny-gpt2 forward


def late_work_graph(n: int = CHAIN) -> dict:
    nodes = [node(0, "output.read", "logits"), node(1, "sum", ref(0)),
             node(2, "mul", ref(1), 0.0), node(3, "add", const("c"), ref(2))]
    nodes += [node(i, "matmul", ref(i - 1), const("c")) for i in range(4, n)]
    return graph(nodes=nodes, constants=["c"], saves={"y": n - 1})


def read_graph() -> dict:
    return graphs.read_graph(sites=[SITE], names=["resid"])


@pytest.fixture
def server(hosted):
    srv = hs.start(models={"tiny-gpt2": hosted["tiny-gpt2"].bridge}, port=0,
                   limits=Limits(max_request_seconds=120))
    yield srv
    srv.stop()


def test_light_requests_overtake_a_long_one_and_all_equal_local(server, hosted):
    bridge = hosted["tiny-gpt2"].bridge
    tokens = bridge.to_tokens(["hello world"])
    c = torch.randn(256, 256, generator=torch.Generator().manual_seed(0)) / 16
    seen = {}
    with torch.no_grad():
        logits = bridge.run_with_hooks(tokens, fwd_hooks=[
            (SITE, lambda act, hook: seen.__setitem__("resid", act.clone()))])
        y = c + logits.sum() * 0.0
        for _ in range(4, CHAIN):
            y = y @ c
    long_conn, light_conn = Connection(server.url), Connection(server.url)
    finished = {}

    def long_request():
        finished["long_result"] = long_conn.run(late_work_graph(), {"input_ids": tokens, "c": c})
        finished["long"] = time.monotonic()

    thread = threading.Thread(target=long_request)
    try:
        thread.start()
        worker = server.server.worker
        deadline = time.monotonic() + 60
        while not worker.current and time.monotonic() < deadline:
            time.sleep(0.001)
        light_done = []
        while thread.is_alive() and len(light_done) < 3:
            result = light_conn.run(read_graph(), {"input_ids": tokens})
            light_done.append(time.monotonic())
            torch.testing.assert_close(result.values["__logits__"], logits, rtol=0, atol=0)
            torch.testing.assert_close(result.values["resid"], seen["resid"], rtol=0, atol=0)
        thread.join(120)
    finally:
        long_conn.close()
        light_conn.close()
    # Three light requests, each queued after the long one began, finished before it.
    assert len(light_done) == 3 and max(light_done) < finished["long"]
    torch.testing.assert_close(finished["long_result"].values["y"], y)
    torch.testing.assert_close(finished["long_result"].values["__logits__"], logits)
