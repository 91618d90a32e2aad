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
from pipelined import PipelinedClient

import hookwire.server as hs
from hookwire.client import Connection
from hookwire.families import build_hf_model
from hookwire.server.device_rates import rates_for
from hookwire.server.give_way import GiveWay
from hookwire.server.models import BUILTIN_MODELS
from hookwire.server.worker import IN_PLACE_SECONDS
from hookwire.validate import Limits

SITE = "blocks.0.hook_resid_post"
CHAIN = 400  # matmuls of 256 x 256 after the forward: long next to a tiny-gpt2 forward


def wait_until_queued(scheduler, n: int) -> None:
    """Hold the worker (called from a hook inside a forward) until ``n`` requests are queued,
    then for two give-way quanta more: the forward looked for light requests at its last
    point and found none, and looks again only once a quantum has passed
    (``GiveWay.QUANTUM_S``). Released sooner, on a loaded machine where the requests queued
    within the quantum, the next point was skipped and they ran after the long one."""
    deadline = time.monotonic() + 60
    while scheduler.qsize() < n and time.monotonic() < deadline:
        time.sleep(0.001)
    time.sleep(2 * GiveWay.QUANTUM_S)


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


def long_beside_light(server, long_conn, long_graph, long_tensors: dict, under_way,
                      light_tensors: dict, handles=(), light_graph=None) -> dict:
    """Run a long request on ``long_conn``; once ``under_way()`` says it is (it may wait, up
    to a minute), three light read requests (``light_graph``, else :func:`read_graph`) of
    three other users (keyless connections). Every
    result by key ("long", 0, 1, 2); every thread joined, connection closed and hook
    ``handles`` removed, even on failure."""
    light_conns = [Connection(server.url) for _ in range(3)]
    results: dict = {}

    def run(key, conn, graph, tensors):
        results[key] = conn.run(graph, tensors)

    threads = [threading.Thread(target=run, args=("long", long_conn, long_graph, long_tensors))]
    try:
        threads[0].start()
        assert under_way(), "the long request did not get under way"
        for i, conn in enumerate(light_conns):
            threads.append(threading.Thread(target=run, args=(
                i, conn, light_graph or read_graph(), light_tensors)))
            threads[-1].start()
        for t in threads:
            t.join(120)
    finally:
        for conn in [long_conn, *light_conns]:
            conn.close()
        for handle in handles:
            handle.remove()
    assert not any(t.is_alive() for t in threads)
    return results


def assert_light_forwards_first(rows: list, long_rows: int) -> None:
    """The light requests' forwards (one row each, batched or not: three rows) ran before
    the long request's (``long_rows`` rows), by the rows of each forward in order."""
    assert long_rows in rows and sum(rows[:rows.index(long_rows)]) == 3, rows


def assert_light_results(results: dict, logits, resid) -> None:
    """The three light requests' results, bit-equal to their solo run."""
    for i in range(3):
        torch.testing.assert_close(results[i].values["__logits__"], logits, rtol=0, atol=0)
        torch.testing.assert_close(results[i].values["resid"], resid, rtol=0, atol=0)


def light_reference(bridge):
    """The light request's tokens, and its logits and resid read by local TL."""
    tokens, seen = bridge.to_tokens(["hello world"]), {}
    with torch.no_grad():
        logits = bridge.run_with_hooks(tokens, fwd_hooks=[
            (SITE, lambda act, hook: seen.__setitem__("resid", act.clone()))])
    return tokens, logits, seen["resid"]


LONG_SITES = ["blocks.0.hook_resid_pre", "blocks.1.ln1.hook_normalized"]


def watch_rows(bridge, long_rows: int):
    """What the served model runs, seen by plain torch hooks of the test (they fire for every
    forward, nested or not): an event set once a forward of ``long_rows`` rows enters block
    0, the rows of each forward leaving the last block in order, and the hooks' handles."""
    started, order = threading.Event(), []

    def entering(module, args):
        if args[0].shape[0] == long_rows:
            started.set()

    def leaving(module, args, output):
        order.append(args[0].shape[0])

    return started, order, [bridge.blocks[0].register_forward_pre_hook(entering),
                            bridge.blocks[-1].register_forward_hook(leaving)]


def test_light_requests_run_between_two_blocks_of_a_long_forward(server, hosted):
    """A long forward (256 x 256 tokens) gives way between its blocks: three light requests of
    other users, queued while its first block runs, run as forwards nested in it before its
    last block ends -- each bit-equal to its solo run, the long one equal to local TL. Its TL
    hook marks (it reads ``hook_normalized``) are off the model while they run."""
    bridge = hosted["tiny-gpt2"].bridge
    light_tokens, light_logits, light_resid = light_reference(bridge)
    long_tokens = torch.randint(0, 256, (256, 256), generator=torch.Generator().manual_seed(3))
    seen: dict = {}
    with torch.no_grad():
        long_logits = bridge.run_with_hooks(long_tokens, fwd_hooks=[
            (name, lambda act, hook, name=name: seen.__setitem__(name, act.clone()))
            for name in LONG_SITES])
    started, order, handles = watch_rows(bridge, 256)
    long_graph = graphs.read_graph(sites=LONG_SITES, names=LONG_SITES)
    # The light requests queued while its block 0 runs (~1 s here); they leave the last
    # block before the long one does.
    results = long_beside_light(server, Connection(server.url), long_graph,
                                {"input_ids": long_tokens}, lambda: started.wait(60),
                                {"input_ids": light_tokens}, handles)
    assert_light_forwards_first(order, 256)
    assert_light_results(results, light_logits, light_resid)
    torch.testing.assert_close(results["long"].values["__logits__"], long_logits)
    for name in LONG_SITES:
        torch.testing.assert_close(results["long"].values[name], seen[name])
    # Its timings are wall times: the time it gave way moves its deadline clock, not them
    # (its validation once came out negative by that time).
    timings = results["long"].timings
    assert min(timings["queued_s"], timings["validate_s"], timings["execute_s"]) >= 0, timings
    assert timings["execute_s"] > timings["queued_s"] + timings["validate_s"], timings


def test_light_requests_run_between_two_blocks_of_a_batched_long_forward(hosted):
    """Two long requests that share one forward (32 x 256 tokens each, co-batched: 64 rows)
    give way between its blocks as one long request does: three light requests of other
    users, queued while its first block runs, run as forwards nested in it before its last
    block ends, each bit-equal to its solo run; both long ones equal local TL. Before, a
    batched forward never gave way: a tenant splitting its largest forward into requests
    that co-batch held the worker for the whole forward."""
    srv = hs.start(models={"tiny-gpt2": hosted["tiny-gpt2"].bridge}, port=0,
                   limits=Limits(max_request_seconds=120), batch_window_s=0.5)
    bridge = hosted["tiny-gpt2"].bridge
    light_tokens, light_logits, light_resid = light_reference(bridge)
    gen = torch.Generator().manual_seed(5)
    long_tokens = [torch.randint(0, 256, (32, 256), generator=gen) for _ in range(2)]
    seen: list[dict] = [{}, {}]
    with torch.no_grad():
        long_logits = [bridge.run_with_hooks(t, fwd_hooks=[
            (name, lambda act, hook, name=name, k=k: seen[k].__setitem__(name, act.clone()))
            for name in LONG_SITES]) for k, t in enumerate(long_tokens)]
    started, order, handles = watch_rows(bridge, 64)
    long_client = PipelinedClient(srv.url)
    light_conns = [Connection(srv.url) for _ in range(3)]
    results: dict = {}

    def light(i):
        results[i] = light_conns[i].run(read_graph(), {"input_ids": light_tokens})

    threads = [threading.Thread(target=light, args=(i,)) for i in range(3)]
    try:
        long_graph = graphs.read_graph(sites=LONG_SITES, names=LONG_SITES)
        rids = [long_client.send(long_graph, {"input_ids": t}) for t in long_tokens]
        assert started.wait(60), "the batched forward did not get under way"
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        answers = long_client.collect(rids)
    finally:
        long_client.close()
        for conn in light_conns:
            conn.close()
        for handle in handles:
            handle.remove()
        srv.stop()
    assert not any(t.is_alive() for t in threads)
    for k, rid in enumerate(rids):
        answer = answers[rid]
        assert answer.error is None, answer.error
        assert answer.batch_size == 2, "the long requests must share a forward"
        torch.testing.assert_close(answer.values["__logits__"], long_logits[k])
        for name in LONG_SITES:
            torch.testing.assert_close(answer.values[name], seen[k][name])
    assert_light_forwards_first(order, 64)
    assert_light_results(results, light_logits, light_resid)


MODULE_SITES = ["hf:transformer.h.0:output", "hf:transformer.h.1.mlp:input"]


def local_module_reads(tokens):
    """Logits of a plain local HF tiny-gpt2 (the server's weights) and what torch hooks read
    at ``MODULE_SITES`` there, by site name."""
    spec = BUILTIN_MODELS["tiny-gpt2"]
    local = build_hf_model(spec.architecture, spec.config, seed=spec.seed)[0].eval()
    seen: dict = {}
    reads = [local.transformer.h[0].register_forward_hook(
                 lambda m, args, out: seen.__setitem__(
                     MODULE_SITES[0], (out[0] if isinstance(out, tuple) else out).clone())),
             local.transformer.h[1].mlp.register_forward_pre_hook(
                 lambda m, args: seen.__setitem__(MODULE_SITES[1], args[0].clone()))]
    try:
        with torch.no_grad():
            return local(tokens).logits, seen
    finally:
        for handle in reads:
            handle.remove()


@pytest.mark.parametrize("light_kind", ["tl", "module_sites"])
def test_light_requests_run_between_two_blocks_of_a_long_module_site_forward(server, hosted,
                                                                             light_kind):
    """A long forward reading HF module sites (256 x 256 tokens; it runs in the plain HF
    forward, on a mirror of the model sharing its parameters) gives way between its blocks
    as a TL forward does: three light requests of other users -- TL reads, or module-site
    reads run in the same plain tree, nested in its own forward -- queued while its first
    block runs, run as forwards nested in it before its last block ends (the TL reads
    co-batch into one forward; the module-site reads, which never share a forward, one at a
    give-way point), each bit-equal to its solo run; the long one equals the same reads by torch hooks on a plain local HF
    model. Before, a module-site forward never gave way: a tenant held the worker for the
    largest forward the limits admit by reading one HF module site."""
    bridge = hosted["tiny-gpt2"].bridge
    plain = server.server.entries["tiny-gpt2"].hf_model  # the tree module sites run in
    if light_kind == "tl":
        light_tokens, light_logits, light_resid = light_reference(bridge)
        light_graph = read_graph()
    else:
        light_tokens = bridge.to_tokens(["hello world"])
        light_logits, light_seen = local_module_reads(light_tokens)
        light_resid = light_seen[MODULE_SITES[0]]
        light_graph = graphs.read_graph(sites=MODULE_SITES[:1], names=["resid"])
    long_tokens = torch.randint(0, 256, (256, 256), generator=torch.Generator().manual_seed(4))
    long_logits, seen = local_module_reads(long_tokens)
    # Forwards leaving the last block of either tree, by rows, in order.
    started, order, handles = watch_rows(bridge, 256)
    handles += [plain.transformer.h[0].register_forward_pre_hook(
                    lambda m, args: started.set() if args[0].shape[0] == 256 else None),
                plain.transformer.h[-1].register_forward_hook(
                    lambda m, args, out: order.append(args[0].shape[0]))]
    long_graph = graphs.read_graph(sites=MODULE_SITES, names=MODULE_SITES)
    results = long_beside_light(server, Connection(server.url), long_graph,
                                {"input_ids": long_tokens}, lambda: started.wait(60),
                                {"input_ids": light_tokens}, handles, light_graph)
    if light_kind == "tl":
        assert_light_forwards_first(order, 256)  # (they co-batch: one nested forward)
    else:
        # Module-site graphs never share a forward: one light forward per give-way point
        # (after block 0's attention, block 1's pre-hook, after its attention), each
        # after the long one has run on for as long as it gave way.
        assert order.index(256) >= 1 and len(order) == 4, order
    assert_light_results(results, light_logits, light_resid)
    torch.testing.assert_close(results["long"].values["__logits__"], long_logits)
    for name in MODULE_SITES:
        torch.testing.assert_close(results["long"].values[name], seen[name])


def small_forward_held_for(server, bridge, small, other_graph, other_tensors):
    """A forward of ``small`` tokens (no hooks), held at its first block until another
    user's request (``other_graph``) has queued, then let go past the give-way quantum.
    Returns both results ("small", "other") and the (rows, positions) of each forward leaving
    the last block, in order; every thread joined, connection closed, hook removed."""
    worker = server.server.worker
    order, released = [], threading.Event()

    def entering(module, args):
        if tuple(args[0].shape[:2]) == tuple(small.shape) and not released.is_set():
            deadline = time.monotonic() + 30
            while not worker.scheduler.qsize() and time.monotonic() < deadline:
                time.sleep(0.001)
            time.sleep(0.01)  # past the give-way quantum whatever the machine
            released.set()

    def leaving(module, args, output):
        order.append(tuple(args[0].shape[:2]))

    handles = [bridge.blocks[0].register_forward_pre_hook(entering),
               bridge.blocks[-1].register_forward_hook(leaving)]
    conns = [Connection(server.url), Connection(server.url)]
    results: dict = {}

    def run(key, conn, g, tensors):
        try:
            results[key] = conn.run(g, tensors)
        except Exception as exc:  # reported below, not lost with the thread
            results[key] = exc

    first = threading.Thread(target=run, args=("small", conns[0], graph(nodes=[]),
                                               {"input_ids": small}))
    second = threading.Thread(target=run, args=("other", conns[1], other_graph,
                                                other_tensors))
    try:
        first.start()
        deadline = time.monotonic() + 60
        while not worker.current and time.monotonic() < deadline:
            time.sleep(0.001)
        second.start()
        first.join(120)
        second.join(120)
    finally:
        for conn in conns:
            conn.close()
        for handle in handles:
            handle.remove()
    assert released.is_set() and not first.is_alive() and not second.is_alive()
    errors = {k: v for k, v in results.items() if isinstance(v, Exception)}
    assert not errors, errors
    return results, order


def test_a_forward_gives_way_only_to_requests_no_larger_than_itself(server, hosted):
    """Giving way is for long forwards: a small one (1 x 16 tokens) held at its first block
    while a light-looking but larger request of another user (7 x 256 tokens, under
    ``LIGHT_TOKENS``) queues does not run that request nested in it -- it finishes first,
    and then the larger one runs. (Before, a victim's small forward that had run one
    quantum gave way to an attacker's batch of such requests at its next block.) Both equal
    local TL."""
    bridge = hosted["tiny-gpt2"].bridge
    gen = torch.Generator().manual_seed(7)
    small, large = torch.randint(0, 256, (1, 16), generator=gen), \
        torch.randint(0, 256, (7, 256), generator=gen)
    with torch.no_grad():
        small_logits, large_logits = bridge(small), bridge(large)
    results, order = small_forward_held_for(server, bridge, small, graph(nodes=[]),
                                            {"input_ids": large})
    assert order == [(1, 16), (7, 256)], order
    torch.testing.assert_close(results["small"].values["__logits__"], small_logits)
    torch.testing.assert_close(results["other"].values["__logits__"], large_logits)


def test_a_request_that_proves_long_once_validated_waits_for_the_one_it_would_interrupt(
        server, hosted):
    """A request looks light before validation by its nodes, positions and uploads; one node
    can still be a long op (up to ``max_node_seconds``). A small forward (1 x 8 tokens) held
    at its first block while another user's light-looking request queues -- one token, three
    nodes, a product of an expanded upload estimated at 0.1 s, well over
    ``IN_PLACE_SECONDS`` -- takes it at its next block, validates it, and does not run it
    there (it goes back to the head of its queue, validated): it finishes first, and the
    other request runs after it, equal to local torch. (Before, the small forward ran the
    product nested in itself.)"""
    bridge = hosted["tiny-gpt2"].bridge
    # The product's side from the rates this server measured: estimated at 0.1 s, well over
    # IN_PLACE_SECONDS and well under max_node_seconds however busy the machine was when
    # they were measured (a fixed 2048 was refused as too long on a loaded CI machine).
    rates = rates_for(hosted["tiny-gpt2"].device)
    side = int(min(max((0.1 * rates.contraction_flops / 2) ** (1 / 3), 256), 4096))
    assert 2 * side ** 3 / rates.contraction_flops > 2 * IN_PLACE_SECONDS
    gen = torch.Generator().manual_seed(11)
    small = torch.randint(0, 256, (1, 8), generator=gen)
    one = torch.randint(0, 256, (1, 1), generator=gen)
    column = torch.randn(side, 1, generator=gen)
    with torch.no_grad():
        small_logits = bridge(small)
    product = graph(nodes=[node(0, "expand", const("c"), side, side),
                           node(1, "contiguous", ref(0)), node(2, "matmul", ref(1), ref(1)),
                           node(3, "sum", ref(2))],
                    constants=["c"], saves={"y": 3}, return_type=None)
    results, order = small_forward_held_for(server, bridge, small, product,
                                            {"input_ids": one, "c": column})
    assert order == [(1, 8), (1, 1)], order
    torch.testing.assert_close(results["small"].values["__logits__"], small_logits)
    x = column.expand(side, side).contiguous()
    torch.testing.assert_close(results["other"].values["y"], (x @ x).sum())
    assert not server.server.worker.scheduler.qsize()


def test_light_requests_run_while_a_request_materialises_large_views(hosted):
    """A request whose references to a few resident bytes expand to 1 GiB of copies
    (stride-0 views, each as large as a constant may be) gives way while it copies them: three
    light requests of other users, queued once it is in the worker, run their forwards before
    its own forward starts -- each bit-equal to its solo run -- and its views hold what they
    view."""
    bridge = hosted["tiny-gpt2"].bridge
    light_tokens, light_logits, light_resid = light_reference(bridge)
    long_tokens = torch.randint(0, 256, (5, 4), generator=torch.Generator().manual_seed(4))
    views, n = 16, (64 << 20) // 4  # sixteen views of 64 MiB each (~0.3-1 s of copying)
    forwards = []  # rows of every forward the served model runs, in order
    handle = bridge.blocks[0].register_forward_pre_hook(
        lambda module, args: forwards.append(args[0].shape[0]))
    server = hs.start(models={"tiny-gpt2": bridge}, port=0,
                      limits=Limits(max_request_seconds=120, max_constant_bytes=1 << 30))
    long_conn = Connection(server.url)
    worker = server.server.worker

    def in_the_worker() -> bool:
        deadline = time.monotonic() + 60
        while not worker.current and time.monotonic() < deadline:
            time.sleep(0.0005)
        return bool(worker.current)

    try:
        # A result the server keeps; then sixteen stride-0 views of it, which the client sends
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
        results = long_beside_light(server, long_conn, long_graph, tensors, in_the_worker,
                                    {"input_ids": light_tokens})
    finally:
        handle.remove()
        long_conn.close()
        server.stop()
    assert_light_forwards_first(forwards, 5)  # (entering block 0)
    assert_light_results(results, light_logits, light_resid)
    assert results["long"].tensors_referenced == views
    for i in range(views):
        torch.testing.assert_close(results["long"].values[f"last{i}"], small.flatten()[i])


def test_light_requests_run_at_a_block_site_where_a_long_graph_works(server, hosted):
    """A request whose graph runs matmuls at the last block's output -- during its forward,
    after the last point between two blocks -- gives way there (``ModelEntry.block_sites``):
    three light requests of other users, queued while its last block runs (the test holds it
    inside that block's attention until they are), run as forwards nested at that site and
    leave the last block before it does; each bit-equal to its solo run, the long one equal
    to local TL."""
    bridge = hosted["tiny-gpt2"].bridge
    site = "blocks.1.hook_resid_post"
    assert site in server.server.entries["tiny-gpt2"].block_sites
    light_tokens, light_logits, light_resid = light_reference(bridge)
    long_tokens = torch.randint(0, 256, (5, 8), generator=torch.Generator().manual_seed(5))
    c = torch.randn(256, 256, generator=torch.Generator().manual_seed(6)) / 16
    n = 40
    nodes = [node(0, "site.read", 0), node(1, "sum", ref(0)), node(2, "mul", ref(1), 0.0),
             node(3, "add", const("c"), ref(2))]
    nodes += [node(i, "matmul", ref(i - 1), const("c")) for i in range(4, n)]
    long_graph = graphs.graph(nodes=nodes, sites=[site], constants=["c"], saves={"y": n - 1})
    seen: dict = {}
    with torch.no_grad():
        long_logits = bridge.run_with_hooks(long_tokens, fwd_hooks=[
            (site, lambda act, hook: seen.__setitem__("long", act.clone()))])
        y = c + seen["long"].sum() * 0.0
        for _ in range(4, n):
            y = y @ c
    started, order = threading.Event(), []
    scheduler = server.server.worker.scheduler

    def hold_until_queued(module, args, output):
        # Inside the long forward's last block, past its last point between blocks: wait
        # here until the three light requests are queued (the worker is held meanwhile).
        if args[0].shape[0] == 5:
            started.set()
            wait_until_queued(scheduler, 3)

    handles = [bridge.blocks[-1].attn.register_forward_hook(hold_until_queued),
               bridge.blocks[-1].register_forward_hook(
                   lambda module, args, output: order.append(args[0].shape[0]))]
    results = long_beside_light(server, Connection(server.url), long_graph,
                                {"input_ids": long_tokens, "c": c}, lambda: started.wait(60),
                                {"input_ids": light_tokens}, handles)
    assert_light_forwards_first(order, 5)  # (leaving the last block)
    assert_light_results(results, light_logits, light_resid)
    torch.testing.assert_close(results["long"].values["__logits__"], long_logits)
    torch.testing.assert_close(results["long"].values["y"], y)


def test_light_requests_run_inside_a_long_forwards_attention(server, hosted):
    """A forward gives way inside each attention too, once its scores are made and once its
    pattern is (``ModelEntry.attention_sites``; attention is most of a long sequence's
    block), whether or not its graph has nodes there. A request that only reads the logits:
    three light requests of other users, queued while its last block's attention runs (the
    test holds it just before the scores' hook point until they are), run as forwards nested
    there and leave the last block before it does; each bit-equal to its solo run, the long
    one equal to local TL. Before, it could give way only between blocks: they ran after."""
    bridge = hosted["tiny-gpt2"].bridge
    assert "blocks.1.attn.hook_attn_scores" in server.server.entries["tiny-gpt2"].attention_sites
    light_tokens, light_logits, light_resid = light_reference(bridge)
    long_tokens = torch.randint(0, 256, (5, 8), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        long_logits = bridge(long_tokens)
    started, order = threading.Event(), []
    scheduler = server.server.worker.scheduler

    def hold_until_queued(module, args):
        if args[0].shape[0] == 5:  # the long forward, past its last point between blocks
            started.set()
            wait_until_queued(scheduler, 3)

    handles = [bridge.blocks[-1].attn.hook_attn_scores.register_forward_pre_hook(
                   hold_until_queued),
               bridge.blocks[-1].register_forward_hook(
                   lambda module, args, output: order.append(args[0].shape[0]))]
    results = long_beside_light(server, Connection(server.url), graph(),
                                {"input_ids": long_tokens}, lambda: started.wait(60),
                                {"input_ids": light_tokens}, handles)
    assert_light_forwards_first(order, 5)  # (leaving the last block)
    assert_light_results(results, light_logits, light_resid)
    torch.testing.assert_close(results["long"].values["__logits__"], long_logits,
                               rtol=0, atol=0)


def test_light_requests_run_after_the_attention_of_a_long_module_site_forward(server, hosted):
    """A forward reading HF module sites gives way after each block's attention module too
    (``ModelEntry.hf_attention_points``: between a block's attention and its MLP; HF
    attention is one call). It reads block 0's output; three light TL requests of other
    users, queued while its last block's attention runs (the test holds it at that
    module's pre-hook until they are), run as forwards nested there and leave the last
    block before it does, each bit-equal to its solo run; the long one equals the same read
    by a torch hook on a plain local HF model. Before, it could give way only between blocks:
    they ran after."""
    plain = server.server.entries["tiny-gpt2"].hf_model
    assert plain.transformer.h[-1].attn in server.server.entries["tiny-gpt2"].hf_attention_points
    bridge = hosted["tiny-gpt2"].bridge
    light_tokens, light_logits, light_resid = light_reference(bridge)
    long_tokens = torch.randint(0, 256, (5, 8), generator=torch.Generator().manual_seed(8))
    long_logits, seen = local_module_reads(long_tokens)
    started, order = threading.Event(), []
    scheduler = server.server.worker.scheduler

    def hold_until_queued(module, args, kwargs):
        if kwargs.get("hidden_states", args[0] if args else None).shape[0] == 5:
            started.set()
            wait_until_queued(scheduler, 3)

    def leaving(module, args, output):
        order.append(args[0].shape[0])

    handles = [plain.transformer.h[-1].attn.register_forward_pre_hook(hold_until_queued,
                                                                      with_kwargs=True),
               plain.transformer.h[-1].register_forward_hook(leaving),
               bridge.blocks[-1].register_forward_hook(leaving)]
    long_graph = graphs.read_graph(sites=MODULE_SITES[:1], names=["h0"])
    results = long_beside_light(server, Connection(server.url), long_graph,
                                {"input_ids": long_tokens}, lambda: started.wait(60),
                                {"input_ids": light_tokens}, handles)
    assert_light_forwards_first(order, 5)  # (leaving the last block)
    assert_light_results(results, light_logits, light_resid)
    torch.testing.assert_close(results["long"].values["__logits__"], long_logits)
    torch.testing.assert_close(results["long"].values["h0"], seen[MODULE_SITES[0]])


def test_light_requests_run_between_the_tokens_of_a_long_generation(hosted):
    """A generate request runs alone, one forward per token, and light requests of other
    users waiting behind it waited for its last token (a 1 x 8 read waited a whole
    240-token generation, 2.4 s). Between two tokens the model is not in use -- the KV cache
    is the request's own -- so they run there now: three light reads queued after the
    generation began finish before it, bit-equal to local TL, and the generation equals
    HF's generate run locally with hookwire's local model."""
    import hookwire.hf as hhf
    from hookwire.server.hf_modules import plain_hf_model
    from serving import serving

    hosted_model = hosted["tiny-gpt2"]
    tokens, logits, resid = light_reference(hosted_model.bridge)
    prompt = torch.randint(0, 256, (32, 8), generator=torch.Generator().manual_seed(3))
    n = 240
    # (the plain HF tree of the served weights, as the server generates with: the TL
    # bridge's wrapped modules are not the reference for a KV-cache step)
    want = hhf.LocalModel(plain_hf_model(hosted_model.bridge)).generate(prompt, n,
                                                                       eos_token_id=None)
    with serving(models={"tiny-gpt2": hosted_model.bridge},
                 limits=Limits(max_request_seconds=120)) as srv:
        generated = {}

        def generate():
            generated["out"] = hhf.RemoteModel("tiny-gpt2").generate(prompt, n,
                                                                     eos_token_id=None)
            generated["at"] = time.monotonic()

        thread = threading.Thread(target=generate)
        light_conn = Connection(srv.url)
        try:
            thread.start()
            worker = srv.server.worker
            deadline = time.monotonic() + 60
            while not any(job.submit.generate is not None for job in worker.current) and \
                    time.monotonic() < deadline:
                time.sleep(0.001)
            light_done = []
            while thread.is_alive() and len(light_done) < 3:
                result = light_conn.run(read_graph(), {"input_ids": tokens})
                light_done.append(time.monotonic())
                torch.testing.assert_close(result.values["__logits__"], logits, rtol=0,
                                           atol=0)
                torch.testing.assert_close(result.values["resid"], resid, rtol=0, atol=0)
            thread.join(120)
        finally:
            light_conn.close()
    assert not thread.is_alive()
    assert len(light_done) == 3 and max(light_done) < generated["at"]
    assert torch.equal(generated["out"].sequences, want.sequences)
