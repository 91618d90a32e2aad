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


LONG_SITES = ["blocks.0.hook_resid_pre", "blocks.1.ln1.hook_normalized"]


def test_light_requests_run_between_two_blocks_of_a_long_forward(server, hosted):
    """A long forward (256 x 256 tokens) gives way between its blocks: three light requests of
    other users, queued while its first block runs, run as forwards nested in it before its
    last block ends -- each bit-equal to its solo run, the long one equal to local TL. Its TL
    hook marks (it reads ``hook_normalized``) are off the model while they run."""
    bridge = hosted["tiny-gpt2"].bridge
    light_tokens = bridge.to_tokens(["hello world"])
    long_tokens = torch.randint(0, 256, (256, 256), generator=torch.Generator().manual_seed(3))
    seen: dict = {}
    with torch.no_grad():
        light_logits = bridge.run_with_hooks(light_tokens, fwd_hooks=[
            (SITE, lambda act, hook: seen.__setitem__("resid", act.clone()))])
        long_logits = bridge.run_with_hooks(long_tokens, fwd_hooks=[
            (name, lambda act, hook, name=name: seen.__setitem__(name, act.clone()))
            for name in LONG_SITES])
    # What the served model runs, seen by plain torch hooks of this test (they fire for every
    # forward, nested or not): rows entering block 0, rows leaving the last block.
    started, order = threading.Event(), []

    def entering(module, args):
        if args[0].shape[0] == 256:
            started.set()

    def leaving(module, args, output):
        order.append(args[0].shape[0])

    handles = [bridge.blocks[0].register_forward_pre_hook(entering),
               bridge.blocks[-1].register_forward_hook(leaving)]
    long_conn = Connection(server.url)
    light_conns = [Connection(server.url) for _ in range(3)]  # three users (keyless)
    results: dict = {}

    def run(key, conn, graph, tokens):
        results[key] = conn.run(graph, {"input_ids": tokens})

    long_graph = graphs.read_graph(sites=LONG_SITES, names=LONG_SITES)
    threads = [threading.Thread(target=run, args=("long", long_conn, long_graph, long_tokens))]
    try:
        threads[0].start()
        assert started.wait(60), "the long forward did not start"
        for i, conn in enumerate(light_conns):  # queued while its block 0 runs (~1 s here)
            threads.append(threading.Thread(target=run, args=(i, conn, read_graph(),
                                                              light_tokens)))
            threads[-1].start()
        for t in threads:
            t.join(120)
    finally:
        for h in handles:
            h.remove()
        for conn in [long_conn, *light_conns]:
            conn.close()
    assert not any(t.is_alive() for t in threads)
    # The three light forwards left the last block before the long one did.
    assert 256 in order and sum(order[:order.index(256)]) == 3, order
    for i in range(3):
        torch.testing.assert_close(results[i].values["__logits__"], light_logits, rtol=0, atol=0)
        torch.testing.assert_close(results[i].values["resid"], seen["resid"], rtol=0, atol=0)
    torch.testing.assert_close(results["long"].values["__logits__"], long_logits)
    for name in LONG_SITES:
        torch.testing.assert_close(results["long"].values[name], seen[name])


def test_light_requests_run_while_a_request_materialises_large_views(server, hosted):
    """A request whose references to a few resident bytes expand to 512 MiB of copies
    (stride-0 views, each as large as a constant may be) gives way while it copies them: three
    light requests of other users, queued once it is in the worker, run their forwards before
    its own forward starts -- each bit-equal to its solo run -- and its views hold what they
    view."""
    bridge = hosted["tiny-gpt2"].bridge
    light_tokens = bridge.to_tokens(["hello world"])
    long_tokens = torch.randint(0, 256, (5, 4), generator=torch.Generator().manual_seed(4))
    seen: dict = {}
    with torch.no_grad():
        light_logits = bridge.run_with_hooks(light_tokens, fwd_hooks=[
            (SITE, lambda act, hook: seen.__setitem__("resid", act.clone()))])
    views, n = 8, (64 << 20) // 4  # eight views of 64 MiB each
    forwards = []  # rows of every forward the served model runs, in order
    handle = bridge.blocks[0].register_forward_pre_hook(
        lambda module, args: forwards.append(args[0].shape[0]))
    long_conn = Connection(server.url)
    light_conns = [Connection(server.url) for _ in range(3)]  # three users (keyless)
    results: dict = {}
    try:
        # A result the server keeps; then eight stride-0 views of it, which the client sends
        # as references to what the server holds.
        small = long_conn.run(read_graph(), {"input_ids": light_tokens}).values["resid"]
        long_graph = graphs.graph(nodes=[node(i, "getitem", const(f"v{i}"), n - 1)
                                         for i in range(views)],
                                  constants=[f"v{i}" for i in range(views)],
                                  saves={f"last{i}": i for i in range(views)})
        tensors = {"input_ids": long_tokens,
                   **{f"v{i}": small.as_strided([n], [0], i) for i in range(views)}}
        assert all(long_conn.residents.ref_for(tensors[f"v{i}"]) for i in range(views))
        forwards.clear()

        def run(key, conn, graph, tensors, **extra):
            results[key] = conn.run(graph, tensors, **extra)

        threads = [threading.Thread(target=run, args=("long", long_conn, long_graph, tensors))]
        threads[0].start()
        worker = server.server.worker
        deadline = time.monotonic() + 60
        while not worker.current and time.monotonic() < deadline:
            time.sleep(0.0005)
        for i, conn in enumerate(light_conns):
            threads.append(threading.Thread(target=run, args=(i, conn, read_graph(),
                                                              {"input_ids": light_tokens})))
            threads[-1].start()
        for t in threads:
            t.join(120)
    finally:
        handle.remove()
        for conn in [long_conn, *light_conns]:
            conn.close()
    assert not any(t.is_alive() for t in threads)
    # The three light requests' rows (one each, batched or not) were forwarded before the
    # long request's five.
    assert 5 in forwards and sum(forwards[:forwards.index(5)]) == 3, forwards
    for i in range(3):
        torch.testing.assert_close(results[i].values["__logits__"], light_logits, rtol=0, atol=0)
        torch.testing.assert_close(results[i].values["resid"], seen["resid"], rtol=0, atol=0)
    assert results["long"].tensors_referenced == views
    for i in range(views):
        torch.testing.assert_close(results["long"].values[f"last{i}"], small.flatten()[i])


def test_light_requests_run_at_a_block_site_where_a_long_graph_works(server, hosted):
    """A request whose graph runs 1,500 matmuls at the last block's output -- during its
    forward, after the last point between two blocks -- gives way there
    (``ModelEntry.block_sites``): three light requests of other users, queued once its last
    block has begun, run as forwards nested at that site and leave the last block before it
    does; each bit-equal to its solo run, the long one equal to local TL."""
    bridge = hosted["tiny-gpt2"].bridge
    site = "blocks.1.hook_resid_post"
    assert site in server.server.entries["tiny-gpt2"].block_sites
    light_tokens = bridge.to_tokens(["hello world"])
    long_tokens = torch.randint(0, 256, (2, 8), generator=torch.Generator().manual_seed(5))
    c = torch.randn(256, 256, generator=torch.Generator().manual_seed(6)) / 16
    n = 1500
    nodes = [node(0, "site.read", 0), node(1, "sum", ref(0)), node(2, "mul", ref(1), 0.0),
             node(3, "add", const("c"), ref(2))]
    nodes += [node(i, "matmul", ref(i - 1), const("c")) for i in range(4, n)]
    long_graph = graphs.graph(nodes=nodes, sites=[site], constants=["c"], saves={"y": n - 1})
    seen: dict = {}
    with torch.no_grad():
        light_logits = bridge.run_with_hooks(light_tokens, fwd_hooks=[
            (SITE, lambda act, hook: seen.__setitem__("resid", act.clone()))])
        long_logits = bridge.run_with_hooks(long_tokens, fwd_hooks=[
            (site, lambda act, hook: seen.__setitem__("long", act.clone()))])
        y = c + seen["long"].sum() * 0.0
        for _ in range(4, n):
            y = y @ c
    started, order = threading.Event(), []

    def entering(module, args):
        if args[0].shape[0] == 2:
            started.set()

    handles = [bridge.blocks[-1].register_forward_pre_hook(entering),
               bridge.blocks[-1].register_forward_hook(
                   lambda module, args, output: order.append(args[0].shape[0]))]
    long_conn = Connection(server.url)
    light_conns = [Connection(server.url) for _ in range(3)]  # three users (keyless)
    results: dict = {}

    def run(key, conn, graph, tensors):
        results[key] = conn.run(graph, tensors)

    threads = [threading.Thread(target=run, args=("long", long_conn, long_graph,
                                                  {"input_ids": long_tokens, "c": c}))]
    try:
        threads[0].start()
        assert started.wait(60), "the long forward did not reach its last block"
        for i, conn in enumerate(light_conns):
            threads.append(threading.Thread(target=run, args=(i, conn, read_graph(),
                                                              {"input_ids": light_tokens})))
            threads[-1].start()
        for t in threads:
            t.join(120)
    finally:
        for h in handles:
            h.remove()
        for conn in [long_conn, *light_conns]:
            conn.close()
    assert not any(t.is_alive() for t in threads)
    # The light forwards (one row each) left the last block before the long one (two rows).
    assert 2 in order and sum(order[:order.index(2)]) == 3, order
    for i in range(3):
        torch.testing.assert_close(results[i].values["__logits__"], light_logits, rtol=0, atol=0)
        torch.testing.assert_close(results[i].values["resid"], seen["resid"], rtol=0, atol=0)
    torch.testing.assert_close(results["long"].values["__logits__"], long_logits)
    torch.testing.assert_close(results["long"].values["y"], y)
