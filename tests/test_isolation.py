"""Co-tenants cannot touch each other. One test (or a few) per class of attack a hostile
tenant can mount on a shared server, each against a real server on 127.0.0.1 and each
written to fail on the code before the class was closed (SECURITY.md, "Co-tenancy"):

1. writes into batch-shared sites (position ids, rotary tables) reaching batch mates;
2. one member's data (an out-of-range id) failing the whole batch;
3. graph nodes after the last site running past the request's deadline;
4. the event loop doing work proportional to a message (a big control message stalling
   everyone);
5. views of resident values amplifying memory; memory per user and server-wide; unfinished
   submits holding memory forever;
6. finished requests keeping their memory until the cycle collector runs;
7. key files cutting keys at '#', and short keys;
   (8, the client accepting results it never asked for: tests/test_malicious_server.py;
    9, Ray's memory monitor killing a replica: tests/test_ray_engine.py)
plus classes found on the way: right-padding amplifying a batch's output, results nobody
reads piling up, unbounded cancel ids.
"""
from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import textwrap
import threading
import time

import psutil
import pytest
import torch

import hookwire.server as hs
from hookwire.client import Connection
from hookwire.errors import (AuthError, DeadlineExceeded, ExecutionError, FrameError,
                             LimitExceeded)
from hookwire.frames import encode_chunks, header_for
from hookwire.protocol import Error, parse_server_message
from hookwire.residents import content_id
from hookwire.validate import Limits

from graphs import const, graph, node, read_graph, ref
from pipelined import PipelinedClient, equal_values
from serving import wait_for

KEY_A, KEY_B = "tenant-a-0123456789abcdef", "tenant-b-0123456789abcdef"
READ_SITE = "blocks.1.hook_resid_post"
MiB = 1 << 20


def rss() -> int:
    return psutil.Process().memory_info().rss


def write_graph(model, site, nodes_after_read, mode="replace", value_node=None):
    """Read ``site``, compute ``nodes_after_read`` (ids from 1), write the last one back."""
    nodes = [node(0, "site.read", 0)] + list(nodes_after_read)
    last = value_node if value_node is not None else nodes[-1]["id"]
    nodes.append(node(99, "site.write", 0, ref(last), mode=mode))
    return graph(model, nodes, [site])


@pytest.fixture(scope="module")
def two_tenants(hosted):
    """Two API keys (two users) and a short batch window, so a pair sent back to back
    shares a forward."""
    srv = hs.start(models={n: h.bridge for n, h in hosted.items()}, port=0,
                   api_keys=[KEY_A, KEY_B], batch_window_s=0.05)
    a, b = PipelinedClient(srv.url, KEY_A), PipelinedClient(srv.url, KEY_B)
    yield srv, a, b
    a.close()
    b.close()
    srv.stop()


def pair(a, b, graph_a, graph_b, tokens, tries=6):
    """Send a's and b's request back to back until they share a forward (or a fails)."""
    for _ in range(tries):
        ra = a.send(graph_a, {"input_ids": tokens})
        rb = b.send(graph_b, {"input_ids": tokens})
        ans_a, ans_b = a.collect([ra])[ra], b.collect([rb])[rb]
        if ans_b.batch_size == 2 or ans_a.batch_size == 2 or ans_b.error is not None:
            return ans_a, ans_b
    return ans_a, ans_b


def solo(client, graph, tokens):
    rid = client.send(graph, {"input_ids": tokens})
    answer = client.collect([rid])[rid]
    assert answer.error is None, answer.error
    return answer


# ---- 1. writes into batch-shared sites ----------------------------------------------------

@pytest.mark.parametrize("model,site", [("tiny-gpt2", "pos_embed.hook_in"),
                                        ("tiny-llama", "rotary_emb.hook_cos"),
                                        ("tiny-llama", "blocks.0.attn.hook_sin")])
def test_a_write_into_a_batch_shared_site_does_not_reach_the_batch_mate(
        two_tenants, local_models, model, site):
    srv, a, b = two_tenants
    tokens = local_models[model].to_tokens(["hello world, again"])
    reader = read_graph(model, [(READ_SITE, 0)])
    expected = solo(b, reader, tokens)
    if site == "pos_embed.hook_in":  # positions reversed: valid ids, a different input
        after = [{"id": 1, "op": "flip", "args": [{"ref": 0}, -1]}]
    else:
        after = [{"id": 1, "op": "mul", "args": [{"ref": 0}, 0.0]}]
    writer = write_graph(model, site, after)
    ans_w, ans_r = pair(a, b, writer, reader, tokens)
    assert ans_w.error is None and ans_r.error is None
    assert equal_values(ans_r.values, expected.values), "the write reached the batch mate"
    assert ans_w.batch_size == 1, "a writer of a batch-shared site must run alone"
    # ...and the writer got what a local TL run with the same hook gives.
    fn = (lambda act, hook: act.flip(-1)) if site == "pos_embed.hook_in" else \
        (lambda act, hook: act * 0.0)
    with torch.no_grad():
        local = local_models[model].run_with_hooks(tokens, fwd_hooks=[(site, fn)])
    torch.testing.assert_close(ans_w.values["__logits__"], local, rtol=0, atol=0)


# ---- 2. one member's data fails the whole batch -------------------------------------------

@pytest.mark.parametrize("model", ["tiny-gpt2", "tiny-llama"])
def test_out_of_range_token_ids_fail_only_their_writer(two_tenants, local_models, model):
    srv, a, b = two_tenants
    tokens = local_models[model].to_tokens(["hello world, again"])
    reader = read_graph(model, [(READ_SITE, 0)])
    expected = solo(b, reader, tokens)
    bad_ids = write_graph(model, "embed.hook_in",
                          [{"id": 1, "op": "add", "args": [{"ref": 0}, 10_000]}])
    ans_w, ans_r = pair(a, b, bad_ids, reader, tokens)
    assert ans_w.error is not None and ans_w.error.code == ExecutionError.code, ans_w.error
    assert "embed.hook_in" in ans_w.error.message and "10" in ans_w.error.message
    assert ans_r.error is None, f"a batch mate's bad ids failed this request: {ans_r.error}"
    assert equal_values(ans_r.values, expected.values)
    assert ans_r.batch_size == 2, "the reader did not share the forward with the bad writer"


def test_out_of_range_position_ids_are_refused_before_the_model_indexes(two_tenants,
                                                                       local_models):
    srv, a, b = two_tenants
    tokens = local_models["tiny-gpt2"].to_tokens(["hello world, again"])
    for delta in (1_000, -100):
        bad = write_graph("tiny-gpt2", "pos_embed.hook_in",
                          [{"id": 1, "op": "add", "args": [{"ref": 0}, delta]}])
        rid = a.send(bad, {"input_ids": tokens})
        err = a.collect([rid])[rid].error
        assert err is not None and err.code == ExecutionError.code
        assert err.details.get("rule") == "value_range", err
    expected = solo(b, read_graph("tiny-gpt2", [(READ_SITE, 0)]), tokens)
    assert expected.batch_size == 1


def test_a_model_error_in_a_batched_forward_is_retried_without_its_cause(two_tenants,
                                                                         local_models):
    """The backstop behind the range checks: with the write-time check switched off for the
    token-id site, the bad ids reach the model, whose embedding guard refuses them mid-
    forward; the batch is run again without the member that wrote, and only it fails."""
    srv, a, b = two_tenants
    entry = srv.server.entries["tiny-gpt2"]
    tokens = local_models["tiny-gpt2"].to_tokens(["hello world, again"])
    reader = read_graph("tiny-gpt2", [("blocks.0.hook_resid_post", 0), (READ_SITE, 0)])
    expected = solo(b, reader, tokens)
    saved = dict(entry.value_ranges)
    entry.value_ranges.clear()
    try:
        bad = write_graph("tiny-gpt2", "embed.hook_in",
                          [{"id": 1, "op": "add", "args": [{"ref": 0}, 10_000]}])
        ans_w, ans_r = pair(a, b, bad, reader, tokens)
    finally:
        entry.value_ranges.update(saved)
    assert ans_w.error is not None and ans_w.error.code == ExecutionError.code
    assert ans_r.error is None, ans_r.error
    assert equal_values(ans_r.values, expected.values)


# ---- 3. the deadline is checked between nodes --------------------------------------------

def test_nodes_after_the_last_site_stop_at_the_deadline(hosted, local_models):
    """Many matmuls that run once the forward is over (they read the logits) are cut off by
    the request's wall-time limit instead of holding the worker to their end."""
    srv = hs.start(models={"tiny-gpt2": hosted["tiny-gpt2"].bridge}, port=0,
                   limits=Limits(max_request_seconds=1.0))
    conn = Connection(srv.url)
    try:
        tokens = local_models["tiny-gpt2"].to_tokens(["hello world"])
        c = torch.randn(512, 512) / 512 ** 0.5
        nodes = [{"id": 0, "op": "output.read", "args": ["logits"]},
                 {"id": 1, "op": "sum", "args": [{"ref": 0}]},
                 {"id": 2, "op": "mul", "args": [{"ref": 1}, 0.0]},
                 {"id": 3, "op": "add", "args": [{"const": "c"}, {"ref": 2}]}]
        for i in range(4, 2004):  # ~2e12 flops: tens of seconds here, uncounted time
            nodes.append({"id": i, "op": "matmul", "args": [{"ref": i - 1}, {"const": "c"}]})
        graph = {"model": "tiny-gpt2", "inputs": {"input_ids": "input_ids"},
                 "constants": ["c"], "sites": [], "nodes": nodes, "saves": {"y": 2003},
                 "forward": {"return_type": "logits"}}
        with pytest.raises(DeadlineExceeded):
            conn.run(graph, {"input_ids": tokens, "c": c})
        # The same connection (and the worker) serve the next request right away.
        out = conn.run(read_graph("tiny-gpt2", [(READ_SITE, 0)]), {"input_ids": tokens})
        assert out.values["__logits__"].shape == (1, tokens.shape[1], 257)
    finally:
        conn.close()
        srv.stop()


def _flushed(fn):
    """``fn()`` computed as the server computes on CPU: subnormals flushed to zero (in a
    thread of its own, so this process's own mode is left as it was)."""
    out = []

    def run():
        torch.set_flush_denormal(True)
        out.append(fn())
    worker = threading.Thread(target=run)
    worker.start()
    worker.join()
    return out[0]


def test_subnormal_values_cost_what_the_budget_prices(hosted, local_models):
    """A product of subnormal floats (1e-40) with normal ones is subnormal at every step,
    and on x86 each step takes a microcode assist: 4.3 s instead of 25 ms for one 1024 x 1024
    matrix product here, ~170x its flops budget, in one op the deadline cannot interrupt
    (bench_fairness ``subnormals``: a co-tenant's read queued 17 s). The server's model
    worker computes with subnormals flushed to zero, as GPUs' fast paths do: the result
    equals local torch's in that mode (before: the subnormal products themselves), a normal
    product equals local torch bit for bit, and a co-batched reader beside a tenant writing
    subnormals into its own residual rows gets its solo result."""
    srv = hs.start(models={"tiny-gpt2": hosted["tiny-gpt2"].bridge}, port=0,
                   api_keys=[KEY_A, KEY_B], batch_window_s=0.05)
    a, b = PipelinedClient(srv.url, KEY_A), PipelinedClient(srv.url, KEY_B)
    try:
        tokens = local_models["tiny-gpt2"].to_tokens(["hello world, again"])
        gen = torch.Generator().manual_seed(0)
        tiny = torch.rand(64, 64, generator=gen) * 1e-40  # all subnormal (or 0)
        w = torch.randn(64, 64, generator=gen)
        product = graph("tiny-gpt2", [node(0, "matmul", {"const": "t"}, {"const": "w"})],
                        saves={"y": 0}, constants=["t", "w"], return_type=None)
        rid = a.send(product, {"input_ids": tokens, "t": tiny, "w": w})
        answer = a.collect([rid])[rid]
        assert answer.error is None, answer.error
        expected = _flushed(lambda: tiny @ w)
        assert torch.count_nonzero(tiny @ w) > 0 and torch.count_nonzero(expected) == 0
        torch.testing.assert_close(answer.values["y"], expected, rtol=0, atol=0)
        rid = a.send(product, {"input_ids": tokens, "t": w, "w": w.T.contiguous()})
        normal = a.collect([rid])[rid]
        torch.testing.assert_close(normal.values["y"], w @ w.T, rtol=0, atol=0)
        # A tenant writing subnormals into its rows of a shared forward changes nothing for
        # its batch mate.
        reader = read_graph("tiny-gpt2", [(READ_SITE, 0)])
        expected_read = solo(b, reader, tokens)
        writer = write_graph("tiny-gpt2", "blocks.0.hook_resid_post",
                             [node(1, "mul", ref(0), 1e-40)])
        ans_w, ans_r = pair(a, b, writer, reader, tokens)
        assert ans_w.error is None and ans_r.error is None
        assert ans_r.batch_size == 2, "the pair must share a forward for this to test it"
        assert equal_values(ans_r.values, expected_read.values)
    finally:
        a.close()
        b.close()
        srv.stop()


def test_one_op_longer_than_the_server_allows_is_refused_before_it_runs(hosted, local_models):
    """An op runs to its end once started: neither the deadline nor giving way to other
    users can interrupt it, so the largest matrix product a shared server's byte limits
    admitted held the model worker for seconds, and every co-tenant with it
    (bench_fairness ``one_op``: victim p99 38x idle). The server now estimates each op's time
    on its own device before anything runs (``hookwire.op_time``, from rates it measured at
    start) and refuses one over ``max_node_seconds``, naming the node and the rule: an
    8192 x 8192 product (1.1e12 flops: seconds on any CPU, where before it ran) of a 32 KB
    upload expanded, under a 0.1 s limit. The same graph at 64 x 64 runs and equals local
    torch, and a co-tenant is served as it would be alone."""
    srv = hs.start(models={"tiny-gpt2": hosted["tiny-gpt2"].bridge}, port=0,
                   api_keys=[KEY_A, KEY_B], limits=Limits(max_node_seconds=0.1))
    a, b = PipelinedClient(srv.url, KEY_A), PipelinedClient(srv.url, KEY_B)
    try:
        tokens = local_models["tiny-gpt2"].to_tokens(["hello world, again"])
        gen = torch.Generator().manual_seed(0)

        def product(side):
            return graph("tiny-gpt2", [node(0, "expand", const("s"), side, side),
                                       node(1, "matmul", ref(0), ref(0))],
                         saves={"y": 1}, constants=["s"], return_type=None)
        column = torch.randn(8192, 1, generator=gen)
        rid = a.send(product(8192), {"input_ids": tokens, "s": column})
        refused = a.collect([rid])[rid]
        assert refused.error is not None and refused.values == {}
        assert refused.error.code == "limit_exceeded"
        assert refused.error.details["rule"] == "max_node_seconds"
        assert refused.error.details["node"] == 1 and "matmul" in refused.error.message
        reader = read_graph("tiny-gpt2", [(READ_SITE, 0)])
        served = solo(b, reader, tokens)
        _, cache = local_models["tiny-gpt2"].run_with_cache(tokens)
        torch.testing.assert_close(served.values[f"{READ_SITE}#0"], cache[READ_SITE],
                                   rtol=1e-5, atol=1e-5)
        column = torch.randn(64, 1, generator=gen)
        rid = a.send(product(64), {"input_ids": tokens, "s": column})
        small = a.collect([rid])[rid]
        assert small.error is None, small.error
        x = column.expand(64, 64)
        torch.testing.assert_close(small.values["y"], x @ x, rtol=1e-6, atol=1e-6)
    finally:
        a.close()
        b.close()
        srv.stop()


# ---- 4. nothing proportional to a message on the event loop ------------------------------

def test_a_huge_control_message_does_not_stall_other_users(hosted, local_models):
    """While the server takes in a maximal graph (100,000 nodes, ~10 MB of JSON), another
    user's small request is answered: parsing happens off the event loop. On a front that
    parses on the loop, the small request waits until the big one is refused."""
    srv = hs.start(models={"tiny-gpt2": hosted["tiny-gpt2"].bridge}, port=0)
    attacker, victim = PipelinedClient(srv.url), Connection(srv.url)
    try:
        tokens = local_models["tiny-gpt2"].to_tokens(["hello world"])
        nodes = [{"id": 0, "op": "site.read", "args": [0]}] + [
            {"id": i, "op": "getitem", "args": [{"ref": i - 1}, [{"slice": [None, None, None]},
                                                               -1]]}
            for i in range(1, Limits().max_nodes)]
        big = {"model": "tiny-gpt2", "inputs": {"input_ids": "input_ids"},
               "sites": [{"name": READ_SITE}], "nodes": nodes, "saves": {},
               "forward": {"return_type": None}}
        order = []
        rid = attacker.send(big, {"input_ids": tokens})
        waiter = threading.Thread(target=lambda: (attacker.collect([rid], timeout=600),
                                                  order.append("attacker")))
        waiter.start()
        time.sleep(0.3)  # the server is now taking in the big message
        out = victim.run(read_graph("tiny-gpt2", [(READ_SITE, 0)]), {"input_ids": tokens})
        order.append("victim")
        waiter.join(600)
        assert out.values[f"{READ_SITE}#0"].shape == (1, tokens.shape[1], 64)
        assert order == ["victim", "attacker"], order
    finally:
        attacker.close()
        victim.close()
        srv.stop()


def test_a_ping_flood_is_charged_and_gives_the_loop_back(hosted, local_models):
    """Pings never become messages, so the front's per-message accounting never saw them: a
    tenant sending pings as fast as TCP takes them held the event loop (a co-tenant's request
    waited up to 12 s in bench_fairness's ping_flood). Now the loop's time taking in a
    connection's bytes is charged to its user, and parsing gives the loop back after each
    slice: the flooder's connection gave way, its time was charged, and a co-tenant's
    requests during the flood are answered, equal to local TL."""
    srv = hs.start(models={"tiny-gpt2": hosted["tiny-gpt2"].bridge}, port=0,
                   api_keys=[KEY_A, KEY_B])
    attacker, victim = PipelinedClient(srv.url, KEY_A), PipelinedClient(srv.url, KEY_B)
    stop = threading.Event()
    burst = (bytes([0x89, 0x80]) + bytes(4)) * 10_000  # empty pings, zero mask key

    def flood():
        while not stop.is_set():
            attacker.ws.socket.sendall(burst)
    flooder = threading.Thread(target=flood, daemon=True)
    try:
        tokens = local_models["tiny-gpt2"].to_tokens(["hello world"])
        _, cache = local_models["tiny-gpt2"].run_with_cache(tokens)
        (state,) = _states_of(srv, [attacker])
        flooder.start()
        deadline = time.monotonic() + 30
        while state.frames.waits < 3 and time.monotonic() < deadline:
            answer = solo(victim, read_graph("tiny-gpt2", [(READ_SITE, 0)]), tokens)
            torch.testing.assert_close(answer.values[f"{READ_SITE}#0"], cache[READ_SITE],
                                       rtol=0, atol=0)
        stop.set()
        flooder.join(30)
        attacker_user = state.user
        assert state.frames.waits >= 3  # its parsing gave the loop back
        assert srv.server.share.received_s.get(attacker_user, 0.0) > 0.005  # and was charged
    finally:
        stop.set()
        attacker.close()
        victim.close()
        srv.stop()


def test_a_ping_flooders_reset_connection_is_released_and_logs_nothing(hosted, local_models,
                                                                        caplog):
    """Reading is cut into slices, and a connection whose user is over its share of the
    front waits between two frames (server/frame_budget.py). A ping-flooding tenant that
    reset its connection there left websockets' parser suspended at end of file: its
    connection never closed (websockets' ``connection_lost`` failed an assertion), so its
    state, its task and its slot among ``max_connections`` stayed for good -- 5 resets, 5
    connections held; enough of them and nobody could connect. And the pings parsed after
    its socket failed were answered with pongs into the dead socket, asyncio logging a
    warning for each (~1,200 lines of the operator's log a disconnect). Now each reset
    connection is released, nothing is logged, and a co-tenant is served, equal to local
    TL."""
    import logging
    import socket as socket_module
    import struct

    srv = hs.start(models={"tiny-gpt2": hosted["tiny-gpt2"].bridge}, port=0,
                   api_keys=[KEY_A, KEY_B])
    victim = PipelinedClient(srv.url, KEY_B)
    burst = (bytes([0x89, 0x80]) + bytes(4)) * 10_000  # empty pings, zero mask key
    try:
        tokens = local_models["tiny-gpt2"].to_tokens(["hello world"])
        _, cache = local_models["tiny-gpt2"].run_with_cache(tokens)
        with caplog.at_level(logging.INFO):
            for _ in range(3):
                attacker = PipelinedClient(srv.url, KEY_A)
                (state,) = _states_of(srv, [attacker])
                sock = attacker.ws.socket
                deadline = time.monotonic() + 30
                while state.frames.waits < 2 and time.monotonic() < deadline:
                    sock.sendall(burst)  # until its parsing has had to give way
                assert state.frames.waits >= 2
                # Gone at once, unread pings left behind: a reset, not a close.
                sock.setsockopt(socket_module.SOL_SOCKET, socket_module.SO_LINGER,
                                struct.pack("ii", 1, 0))
                sock.close()
                wait_for(lambda: state not in srv.server.states)
            assert len(srv.server.states) == 1  # the victim's
            assert srv.server.gate.established.get("127.0.0.1") == 1
            answer = solo(victim, read_graph("tiny-gpt2", [(READ_SITE, 0)]), tokens)
        torch.testing.assert_close(answer.values[f"{READ_SITE}#0"], cache[READ_SITE],
                                   rtol=0, atol=0)
        noise = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
        assert noise == [], f"{len(noise)} lines in the server's log, e.g. {noise[:2]}"
    finally:
        victim.close()
        srv.stop()


def _text_waiting(state) -> int:
    """Characters of text answers in a connection's outbox, not sent yet."""
    return sum(len(item) for item in list(state.outbox._queue) if isinstance(item, str))


def test_a_tenant_that_sends_without_reading_is_no_longer_read(hosted, local_models):
    """Each message may cause a text answer (an error, a model's description: ~30 KB for
    tiny-gpt2 from a 50-byte request). A tenant that sent without reading made them pile up
    in its outbox, uncounted, for as long as it kept sending, until ``send_timeout_s``
    (120 s) dropped it: its malformed messages grew a server by ~4.5 MiB a second. Now the
    server reads such a connection no further once MAX_UNSENT_TEXT_BYTES of answers wait
    (TCP holds the sender back), a co-tenant is served meanwhile (equal to local TL), and
    once the tenant reads, every one of its messages is answered and it is served again."""
    from hookwire.server.app import MAX_UNSENT_TEXT_BYTES

    srv = hs.start(models={"tiny-gpt2": hosted["tiny-gpt2"].bridge}, port=0,
                   api_keys=[KEY_A, KEY_B])
    victim = PipelinedClient(srv.url, KEY_B)
    greedy = PipelinedClient(srv.url, KEY_A)  # its reader stops after 16 unread messages
    asked = 1000
    try:
        tokens = local_models["tiny-gpt2"].to_tokens(["hello world"])
        _, cache = local_models["tiny-gpt2"].run_with_cache(tokens)
        (state,) = _states_of(srv, [greedy])
        request = json.dumps({"type": "model_info", "model": "tiny-gpt2"})
        answer_chars = len(srv.server.entries["tiny-gpt2"].info_json)
        sender = threading.Thread(target=lambda: [greedy.ws.send(request)
                                                  for _ in range(asked)], daemon=True)
        sender.start()
        # (the writer holds one answer out of the queue while the socket is full)
        wait_for(lambda: _text_waiting(state) >= MAX_UNSENT_TEXT_BYTES - answer_chars,
                 timeout=60)
        time.sleep(0.5)  # what the server would still read, it reads now
        held = _text_waiting(state)
        # (before: ~12 MB, every request answered into the outbox)
        assert held <= MAX_UNSENT_TEXT_BYTES + answer_chars, held
        answer = solo(victim, read_graph("tiny-gpt2", [(READ_SITE, 0)]), tokens)
        torch.testing.assert_close(answer.values[f"{READ_SITE}#0"], cache[READ_SITE],
                                   rtol=0, atol=0)
        answered = 0
        while answered < asked:  # now it reads: everything it asked is answered
            msg = parse_server_message(greedy.ws.recv(timeout=60))
            assert msg.type == "model_info", msg
            answered += 1
        sender.join(30)
        assert not sender.is_alive()
        wait_for(lambda: state.queued_text == 0)
        again = solo(greedy, read_graph("tiny-gpt2", [(READ_SITE, 0)]), tokens)
        torch.testing.assert_close(again.values[f"{READ_SITE}#0"], cache[READ_SITE],
                                   rtol=0, atol=0)
    finally:
        victim.close()
        greedy.close()
        srv.stop()


# ---- 5. memory: views of residents, per user, server-wide, unfinished submits -----------

def _keep_small_resident(client: PipelinedClient, tokens) -> str:
    """Upload 64 float32 (256 bytes) and ask the server to keep them: returns the id."""
    small = torch.arange(64, dtype=torch.float32)
    cid = content_id(small)
    rid = client.send(read_graph("tiny-gpt2", [(READ_SITE, 0)], return_type=None),
                      {"input_ids": tokens, "small": small}, keep={"small": cid})
    assert client.collect([rid])[rid].error is None
    return cid


def _view_graph(n: int):
    """Uses constant ``v``: the sum of its last element and its first (of a view)."""
    return {"model": "tiny-gpt2", "inputs": {"input_ids": "input_ids"}, "constants": ["v"],
            "sites": [], "nodes": [{"id": 0, "op": "getitem", "args": [{"const": "v"}, n - 1]},
                                   {"id": 1, "op": "getitem", "args": [{"const": "v"}, 0]},
                                   {"id": 2, "op": "add", "args": [{"ref": 0}, {"ref": 1}]}],
            "saves": {"s": 2}, "forward": {"return_type": None}}


def _send_view(client, cid, n, tokens):
    rid = f"view-{time.monotonic_ns()}"
    client.ws.send(json.dumps({
        "type": "submit", "request_id": rid, "graph": _view_graph(n),
        "tensors": [header_for("input_ids", tokens).model_dump()], "keep_results": False,
        "refs": [{"tid": "v", "resident": cid, "dtype": "float32", "shape": [n],
                  "stride": [0], "offset": 5}]}))
    for frame in encode_chunks(rid, "input_ids", tokens):
        client.ws.send(frame)
    return rid


def _blocker(client, tokens):
    """A request that keeps the worker busy until it is cancelled (a minute of matmuls)."""
    c = torch.randn(1024, 1024) / 32
    nodes = [{"id": 0, "op": "matmul", "args": [{"const": "c"}, {"const": "c"}]}]
    nodes += [{"id": i, "op": "matmul", "args": [{"ref": i - 1}, {"const": "c"}]}
              for i in range(1, 1000)]
    # return_type "loss": it runs alone, so what is queued behind it waits (not co-batched).
    graph = {"model": "tiny-gpt2", "inputs": {"input_ids": "input_ids"}, "constants": ["c"],
             "sites": [], "nodes": nodes, "saves": {}, "forward": {"return_type": "loss"}}
    return client.send(graph, {"input_ids": tokens, "c": c})


def test_a_stride_0_view_of_a_resident_is_counted_before_it_is_allocated(hosted,
                                                                          local_models):
    """A 4-byte element viewed with stride 0 as 128 MiB: each such reference is counted
    against the user's memory budget when it arrives, and materialised only when it runs --
    so eight of them queued behind a long request neither grow the server by 1 GiB nor get
    past the budget."""
    srv = hs.start(models={"tiny-gpt2": hosted["tiny-gpt2"].bridge}, port=0,
                   api_keys=[KEY_A],
                   limits=Limits(max_pending_bytes_per_user=300 * MiB))
    client = PipelinedClient(srv.url, KEY_A)
    try:
        tokens = local_models["tiny-gpt2"].to_tokens(["hello world"])
        cid = _keep_small_resident(client, tokens)
        n = 32 * MiB  # float32 elements: 128 MiB each
        before = rss()
        blocker = _blocker(client, tokens)
        rids = [_send_view(client, cid, n, tokens) for _ in range(8)]
        time.sleep(1.0)  # every submit has arrived and is queued (or refused)
        grown = rss() - before
        client.ws.send(json.dumps({"type": "cancel", "request_id": blocker}))
        answers = client.collect([blocker] + rids)
        refused = [a.error for r, a in answers.items() if r != blocker and a.error is not None]
        ran = [a for r, a in answers.items() if r != blocker and a.error is None]
        assert grown < 200 * MiB, f"the queued views grew the server by {grown / MiB:.0f} MiB"
        assert refused and all(e.code == LimitExceeded.code and
                               e.details.get("rule") == "max_pending_bytes_per_user"
                               for e in refused), refused
        assert ran, "no view ran at all"
        for answer in ran:  # element 5 of the resident, twice
            assert answer.values["s"].item() == 10.0
    finally:
        client.close()
        srv.stop()


def test_large_graphs_count_their_parsed_memory(hosted, local_models):
    """A parsed graph holds ~13x its JSON in Python objects (a maximal one over 120 MiB):
    counted against the user's memory budget before the message is parsed (256 bytes per
    array or object of its JSON), so large graphs queued behind a long request get no past
    the budget (before: all were parsed and queued, however many); those admitted run and
    equal local TL."""
    # Room for two parsed graphs, and for the text of the second while it is parsed (its
    # ~3 MB message is counted twice over from its frame's header: server/frame_budget.py).
    srv = hs.start(models={"tiny-gpt2": hosted["tiny-gpt2"].bridge}, port=0,
                   api_keys=[KEY_A], limits=Limits(max_pending_bytes_per_user=72 * MiB))
    client = PipelinedClient(srv.url, KEY_A)
    try:
        tokens = local_models["tiny-gpt2"].to_tokens(["hello world"])
        n = 40_000  # 3 containers a node: ~30 MiB counted for each graph
        nodes = [node(0, "site.read", 0)] + [node(i, "mul", ref(i - 1), 1.0)
                                            for i in range(1, n)]
        chain = graph(nodes=nodes, sites=["blocks.0.hook_resid_post"], saves={"x": n - 1})
        blocker = _blocker(client, tokens)
        rids = [client.send(chain, {"input_ids": tokens}) for _ in range(5)]
        deadline = time.monotonic() + 60
        while srv.server.memory.pending_total < 60 * MiB and time.monotonic() < deadline:
            time.sleep(0.05)  # the first two are parsed and counted
        assert srv.server.memory.pending_total >= 60 * MiB  # the parsed graphs count
        client.ws.send(json.dumps({"type": "cancel", "request_id": blocker}))
        answers = client.collect([blocker] + rids)
        refused = [a.error for r, a in answers.items() if r != blocker and a.error is not None]
        ran = [a for r, a in answers.items() if r != blocker and a.error is None]
        assert len(refused) == 3 and all(e.code == LimitExceeded.code and
                                         e.details.get("rule") == "max_pending_bytes_per_user"
                                         for e in refused), refused
        assert len(ran) == 2
        _, cache = local_models["tiny-gpt2"].run_with_cache(tokens)
        for answer in ran:  # x * 1.0, 39,999 times
            torch.testing.assert_close(answer.values["x"], cache["blocks.0.hook_resid_post"],
                                       rtol=0, atol=0)
        deadline = time.monotonic() + 30  # the worker finishes a request after its "done"
        while srv.server.memory.pending_total and time.monotonic() < deadline:
            time.sleep(0.05)
        assert srv.server.memory.pending_total == 0  # all given back
    finally:
        client.close()
        srv.stop()


def test_keyless_servers_bound_memory_server_wide(hosted, local_models):
    """Without keys every connection is a user, so a per-user budget alone bounds nothing:
    the server-wide budget does."""
    srv = hs.start(models={"tiny-gpt2": hosted["tiny-gpt2"].bridge}, port=0,
                   limits=Limits(max_pending_bytes_total=300 * MiB))
    clients = [PipelinedClient(srv.url) for _ in range(6)]
    try:
        tokens = local_models["tiny-gpt2"].to_tokens(["hello world"])
        cids = [_keep_small_resident(c, tokens) for c in clients]
        before = rss()
        blocker = _blocker(clients[0], tokens)
        rids = [_send_view(c, cid, 32 * MiB, tokens) for c, cid in zip(clients, cids)]
        time.sleep(1.0)
        grown = rss() - before
        clients[0].ws.send(json.dumps({"type": "cancel", "request_id": blocker}))
        first = clients[0].collect([blocker, rids[0]])
        answers = [first[rids[0]]] + [c.collect([r])[r] for c, r in zip(clients[1:], rids[1:])]
        refused = [a.error for a in answers if a.error is not None]
        assert grown < 200 * MiB, f"queued views grew the server by {grown / MiB:.0f} MiB"
        assert refused and all(e.details.get("rule") == "max_pending_bytes_total"
                               for e in refused), refused
        assert any(a.error is None and a.values["s"].item() == 10.0 for a in answers)
    finally:
        for c in clients:
            c.close()
        srv.stop()


def test_resident_values_are_bounded_server_wide(hosted, local_models):
    srv = hs.start(models={"tiny-gpt2": hosted["tiny-gpt2"].bridge}, port=0,
                   limits=Limits(max_resident_bytes_total=64 * MiB))
    clients = [PipelinedClient(srv.url) for _ in range(3)]
    try:
        tokens = local_models["tiny-gpt2"].to_tokens(["hello world"])
        for k, client in enumerate(clients):
            for i in range(3):  # 3 x 16 MiB kept per user (each user's quota is 1 GiB)
                value = torch.full((4 * MiB,), float(10 * k + i))
                rid = client.send(read_graph("tiny-gpt2", [], return_type=None),
                                  {"input_ids": tokens, "x": value},
                                  keep={"x": content_id(value)})
                assert client.collect([rid])[rid].error is None
        held = sum(store.bytes for store in srv.server.residents._stores.values())
        assert held <= 64 * MiB, f"{held / MiB:.0f} MiB of resident values held"
    finally:
        for c in clients:
            c.close()
        srv.stop()


def test_an_unfinished_submit_times_out(hosted):
    srv = hs.start(models={"tiny-gpt2": hosted["tiny-gpt2"].bridge}, port=0,
                   limits=Limits(submit_timeout_s=1.0))
    client = PipelinedClient(srv.url)
    try:
        client.ws.send(json.dumps({
            "type": "submit", "request_id": "never-finished",
            "graph": read_graph("tiny-gpt2", [(READ_SITE, 0)]),
            "tensors": [{"tid": "input_ids", "dtype": "int64", "shape": [1, 8 * MiB]}]}))
        msg = None
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            msg = parse_server_message(client.ws.recv(timeout=deadline - time.monotonic()))
            if isinstance(msg, Error):
                break
        assert isinstance(msg, Error) and msg.request_id == "never-finished"
        assert msg.code == FrameError.code and "second" in msg.message
        assert srv.server.memory.pending_total == 0
    finally:
        client.close()
        srv.stop()


def _text_frame_head(length: int) -> bytes:
    """A client's text frame header: final, masked with a zero key (the payload goes as is)."""
    return bytes([0x81, 0x80 | 127]) + length.to_bytes(8, "big") + bytes(4)


def test_messages_being_received_are_counted_before_they_are_buffered(hosted, local_models):
    """websockets reads a message whole before the server sees it. Six connections of one
    tenant each send half of a 6 MiB message and stop. Before, the server buffered every one
    of them outside any budget (with the default limits: up to 64 MiB a message, two a
    connection, 32 connections a tenant). Now each frame is counted from its header, before
    its payload is buffered -- twice its length, within the tenant's 40 MiB, so three fit --
    and the three connections that find no room are no longer read (their bytes wait in the
    kernel). A co-tenant is served meanwhile, equal to local TL; once the messages are
    finished each one is answered (nothing lost), and everything counted goes back."""
    size = 6 * MiB
    srv = hs.start(models={"tiny-gpt2": hosted["tiny-gpt2"].bridge}, port=0,
                   api_keys=[KEY_A, KEY_B],
                   limits=Limits(max_pending_bytes_per_user=40 * MiB,
                                 max_message_bytes=8 * MiB))
    senders = [PipelinedClient(srv.url, KEY_A) for _ in range(6)]
    victim = PipelinedClient(srv.url, KEY_B)
    try:
        bodies = []
        for k in range(len(senders)):
            head = json.dumps({"type": "submit", "request_id": f"m{k}", "pad": ""})
            bodies.append((head[:-2] + "x" * (size - len(head)) + '"}').encode())
            assert len(bodies[-1]) == size
            senders[k].ws.socket.sendall(_text_frame_head(size) + bodies[k][:size // 2])
        deadline = time.monotonic() + 30
        while srv.server.memory.pending_total < 3 * 2 * size and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.5)  # (what else would be read by now)
        counted = srv.server.memory.pending_total
        assert counted == 3 * 2 * size  # three frames counted, twice their length each
        buffered = sum(len(st.ws.protocol.reader.buffer) for st in srv.server.states)
        # The three counted frames' halves, and at most one read (256 KiB) of each other one.
        assert buffered <= 3 * (size // 2) + 3 * (1 * MiB), buffered

        tokens = local_models["tiny-gpt2"].to_tokens(["hello world"])
        answer = solo(victim, read_graph("tiny-gpt2", [(READ_SITE, 0)]), tokens)
        _, cache = local_models["tiny-gpt2"].run_with_cache(tokens)
        torch.testing.assert_close(answer.values[f"{READ_SITE}#0"], cache[READ_SITE])

        rest = [threading.Thread(target=c.ws.socket.sendall, args=(b[size // 2:],))
                for c, b in zip(senders, bodies)]
        for t in rest:
            t.start()
        for k, client in enumerate(senders):
            msg = parse_server_message(client.ws.recv(timeout=60))
            assert isinstance(msg, Error) and msg.request_id == f"m{k}", msg
            assert msg.code == "protocol_error" and "graph" in msg.message, msg
        for t in rest:
            t.join(30)
        deadline = time.monotonic() + 30
        while srv.server.memory.pending_total and time.monotonic() < deadline:
            time.sleep(0.05)
        assert srv.server.memory.pending_total == 0  # all given back
    finally:
        for client in senders + [victim]:
            client.close()
        srv.stop()


def test_a_frame_that_could_never_be_counted_is_refused_and_a_waiting_one_gives_back(hosted):
    """A frame longer than half the tenant's whole budget could never be counted: it is
    refused at its header (close code 1009, as one over ``max_message_bytes``). A connection
    that ends while its frame waits for room leaves nothing counted, and the frame that had
    room goes back when its connection ends too. While it waits, it tries again less and
    less often."""
    from websockets.exceptions import ConnectionClosed
    srv = hs.start(models={"tiny-gpt2": hosted["tiny-gpt2"].bridge}, port=0,
                   api_keys=[KEY_A], limits=Limits(max_pending_bytes_per_user=40 * MiB,
                                                   max_message_bytes=32 * MiB))
    clients = [PipelinedClient(srv.url, KEY_A) for _ in range(3)]
    try:
        clients[0].ws.socket.sendall(_text_frame_head(24 * MiB))
        with pytest.raises(ConnectionClosed) as closed:
            clients[0].ws.recv(timeout=30)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1009
        assert srv.server.memory.pending_total == 0

        for client in clients[1:]:
            client.ws.socket.sendall(_text_frame_head(12 * MiB) + b"x" * MiB)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not (
                srv.server.memory.pending_total == 24 * MiB and
                any(st.frames.waiting for st in list(srv.server.states))):
            time.sleep(0.05)
        assert srv.server.memory.pending_total == 24 * MiB  # one counted, one waiting
        waiting = next(c for c, st in zip(clients[1:], _states_of(srv, clients[1:]))
                       if st.frames.waiting)
        counted = next(c for c in clients[1:] if c is not waiting)
        # Waiting costs the loop little: it tries again less and less often (a thousand
        # waiting connections trying every 20 ms kept the loop busy), up to every 0.32 s.
        (frames,) = [st.frames for st in _states_of(srv, [waiting])]
        tried = frames.retries
        time.sleep(2.0)
        assert 1 <= frames.retries - tried <= 10, frames.retries - tried  # (100 every 20 ms)
        assert frames.waiting and srv.server.memory.pending_total == 24 * MiB
        waiting.ws.socket.close()  # gone while it waits: nothing of it was counted
        time.sleep(0.5)
        assert srv.server.memory.pending_total == 24 * MiB
        counted.ws.socket.close()
        deadline = time.monotonic() + 30
        while srv.server.memory.pending_total and time.monotonic() < deadline:
            time.sleep(0.05)
        assert srv.server.memory.pending_total == 0
    finally:
        for client in clients:
            client.close()
        srv.stop()


def test_a_counted_frame_that_stalls_is_dropped_in_time(hosted):
    """A frame is counted from its header, so a sender that stops half-way would hold a
    whole frame's count: it must arrive within ``submit_timeout_s``, as a submit's uploads
    must, or its connection is closed (1008) and the count goes back."""
    from websockets.exceptions import ConnectionClosed
    srv = hs.start(models={"tiny-gpt2": hosted["tiny-gpt2"].bridge}, port=0,
                   api_keys=[KEY_A], limits=Limits(max_pending_bytes_per_user=40 * MiB,
                                                   submit_timeout_s=1.0))
    client = PipelinedClient(srv.url, KEY_A)
    try:
        client.ws.socket.sendall(_text_frame_head(8 * MiB) + b"x" * MiB)
        with pytest.raises(ConnectionClosed) as closed:
            client.ws.recv(timeout=30)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1008
        assert "did not arrive" in closed.value.rcvd.reason
        deadline = time.monotonic() + 30
        while srv.server.memory.pending_total and time.monotonic() < deadline:
            time.sleep(0.05)
        assert srv.server.memory.pending_total == 0
    finally:
        client.close()
        srv.stop()


def _states_of(srv, clients):
    """The server's connection state of each client (matched by the client's local port)."""
    by_port = {st.ws.remote_address[1]: st for st in list(srv.server.states)}
    return [by_port[c.ws.socket.getsockname()[1]] for c in clients]


# ---- 6. finished requests free their memory without the cycle collector ------------------

def test_finished_requests_release_memory_without_the_cycle_collector(hosted, local_models):
    srv = hs.start(models={"tiny-gpt2": hosted["tiny-gpt2"].bridge}, port=0)
    conn = Connection(srv.url)
    conn.use_residents = False  # nothing is meant to stay
    tokens = local_models["tiny-gpt2"].to_tokens(["hello world"])
    big = torch.ones(64 * MiB // 4)
    graph = {"model": "tiny-gpt2", "inputs": {"input_ids": "input_ids"}, "constants": ["big"],
             "sites": [{"name": READ_SITE}],
             "nodes": [{"id": 0, "op": "site.read", "args": [0]},
                       {"id": 1, "op": "sum", "args": [{"const": "big"}]},
                       {"id": 2, "op": "add", "args": [{"ref": 0}, {"ref": 1}]},
                       {"id": 3, "op": "site.write", "args": [0, {"ref": 2}]}],
             "saves": {}, "forward": {"return_type": "logits"}}
    gc.collect()
    gc.disable()
    try:
        conn.run(graph, {"input_ids": tokens, "big": big})  # warm up allocator and caches
        before = rss()
        for _ in range(5):
            conn.run(graph, {"input_ids": tokens, "big": big})
        time.sleep(0.2)
        grown = rss() - before
        assert grown < 96 * MiB, f"5 finished 64 MiB requests still hold {grown / MiB:.0f} MiB"
    finally:
        gc.enable()
        conn.close()
        srv.stop()


# ---- 7. key files ------------------------------------------------------------------------

def _serve(tmp_path, keys_text: str):
    keys = tmp_path / "keys.txt"
    keys.write_text(keys_text)
    exe = os.path.join(os.path.dirname(sys.executable), "hookwire")
    return subprocess.Popen([exe, "serve", "--model", "tiny-gpt2", "--port", "0",
                             "--api-key-file", str(keys)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def test_a_key_file_line_is_the_whole_key(tmp_path):
    key = "Zq#h7Kf9-PrN2wXv4LmT8sYc"
    proc = _serve(tmp_path, f"# tenants\n{key}\n\n")
    try:
        line = proc.stdout.readline()
        assert line.startswith("hookwire serving "), line + proc.stderr.read()
        url = line.rsplit(" ", 1)[1].strip()
        Connection(url, api_key=key).close()
        with pytest.raises(AuthError):
            Connection(url, api_key="Zq")
    finally:
        proc.terminate()
        proc.wait(60)


def test_short_keys_are_refused_at_start_up(tmp_path):
    proc = _serve(tmp_path, "good-key-0123456789abcdef\nshort\n")
    try:
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
    assert proc.returncode == 2 and "too short" in err, err
    with pytest.raises(ValueError, match="too short"):
        hs.start(models=["tiny-gpt2"], port=0, api_keys=["short"])


# ---- found on the way --------------------------------------------------------------------

def test_right_padding_cannot_blow_up_a_batch(hosted, local_models):
    """One long request and many one-token ones: padded together, every row would carry the
    long one's positions. The batch's padded output stays within ``max_output_bytes``."""
    limit = 4 * MiB
    srv = hs.start(models={"tiny-gpt2": hosted["tiny-gpt2"].bridge}, port=0,
                   batch_window_s=0.3, limits=Limits(max_output_bytes=limit))
    clients = [PipelinedClient(srv.url) for _ in range(33)]
    try:
        long = torch.randint(0, 256, (1, 256))
        short = torch.tensor([[7]])
        graph = read_graph("tiny-gpt2", [], return_type="logits")
        rids = [clients[0].send(graph, {"input_ids": long})]
        rids += [c.send(graph, {"input_ids": short}) for c in clients[1:]]
        answers = [c.collect([r])[r] for c, r in zip(clients, rids)]
        assert all(a.error is None for a in answers)
        padded_bytes = answers[0].batch_size * 256 * 257 * 4
        assert padded_bytes <= limit, f"batch of {answers[0].batch_size} padded to 256"
    finally:
        for c in clients:
            c.close()
        srv.stop()


def test_a_forward_whose_activations_would_pass_the_limit_does_not_run(hosted, local_models):
    """The model's own forward is bounded by its activations too, not only its output: 32
    rows of 256 positions make 96 MiB of attention scores per copy in tiny-gpt2 (whose logits
    are small), refused under ``max_forward_bytes`` before the model runs; 8 rows run and equal
    local TL. Before, only the logits were counted and both ran."""
    srv = hs.start(models={"tiny-gpt2": hosted["tiny-gpt2"].bridge}, port=0,
                   limits=Limits(max_forward_bytes=64 * MiB))
    wte = hosted["tiny-gpt2"].bridge.original_model.transformer.wte
    forwards: list[int] = []  # batch rows of each forward the server's model runs
    counter = wte.register_forward_pre_hook(lambda mod, args: forwards.append(args[0].shape[0]))
    client = PipelinedClient(srv.url)
    try:
        big = torch.randint(0, 256, (32, 256), generator=torch.Generator().manual_seed(1))
        small = big[:8].clone()
        probe = read_graph("tiny-gpt2", ["blocks.0.hook_resid_post"])
        rid_big = client.send(probe, {"input_ids": big})
        rid_small = client.send(probe, {"input_ids": small})
        answers = client.collect([rid_big, rid_small])
        error = answers[rid_big].error
        assert error is not None and error.code == LimitExceeded.code and \
            error.details.get("rule") == "max_forward_bytes", error
        assert 32 not in forwards, forwards
        assert answers[rid_small].error is None, answers[rid_small].error
        logits, cache = local_models["tiny-gpt2"].run_with_cache(small)
        torch.testing.assert_close(answers[rid_small].values["blocks.0.hook_resid_post"],
                                   cache["blocks.0.hook_resid_post"], rtol=1e-5, atol=1e-5)
    finally:
        counter.remove()
        client.close()
        srv.stop()


# In a fresh process: the peak resident growth of one forward through TL's bridge, as the
# server runs it, and what server/forward_memory.py estimates for it (bytes).
FORWARD_PEAK_SCRIPT = textwrap.dedent("""
    import re, sys
    import torch
    from hookwire.server.forward_memory import forward_activation_bytes, model_config
    from hookwire.server.heap import return_freed_memory
    from hookwire.server.models import load_model
    return_freed_memory()  # as a server: freed blocks go back, so growth is what is held
    torch.set_grad_enabled(False)
    torch.set_num_threads(1)
    name, batch, seq = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    hosted = load_model(name)
    bridge = hosted.bridge
    status = lambda key: int(re.search(key + r":\\s+(\\d+)",
                                       open("/proc/self/status").read()).group(1)) * 1024
    tokens = torch.randint(0, 250, (batch, seq))
    bridge(tokens[:1, :8])
    before = status("VmRSS")
    open("/proc/self/clear_refs", "w").write("5")  # the high-water mark starts again here
    logits = bridge(tokens)
    peak = status("VmHWM") - before
    estimate = forward_activation_bytes(model_config(hosted), batch, seq, 4) + \\
        logits.numel() * 4
    print(peak, estimate)
""")


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="Linux's peak RSS")
@pytest.mark.parametrize("model", ["tiny-gpt2", "tiny-llama"])
@pytest.mark.parametrize("batch,seq", [(16, 256), (48, 128), (512, 16)])
def test_the_forward_memory_estimate_bounds_the_measured_peak(model, batch, seq):
    """The estimate behind ``max_forward_bytes`` is an upper bound of what a forward really
    holds at its peak, and not a loose one (within 3x). The process may also keep up to
    ``TRIM_THRESHOLD_BYTES`` of memory the forward freed at the top of its heap (given back
    past that, and when the worker falls idle: server/heap.py), so the measured peak is
    bounded by the estimate plus that much."""
    from hookwire.server.heap import TRIM_THRESHOLD_BYTES

    out = subprocess.run([sys.executable, "-c", FORWARD_PEAK_SCRIPT, model, str(batch),
                          str(seq)], capture_output=True, text=True, timeout=300, check=True)
    peak, estimate = map(int, out.stdout.split())
    assert peak <= estimate + TRIM_THRESHOLD_BYTES and estimate <= 3 * peak, \
        (peak / MiB, estimate / MiB)


def test_cancel_ids_of_requests_never_sent_are_not_kept(hosted):
    srv = hs.start(models={"tiny-gpt2": hosted["tiny-gpt2"].bridge}, port=0)
    client = PipelinedClient(srv.url)
    try:
        for i in range(5000):
            client.ws.send(json.dumps({"type": "cancel", "request_id": f"nope-{i:058d}"}))
        client.ws.send(json.dumps({"type": "model_info", "model": "tiny-gpt2"}))
        assert parse_server_message(client.ws.recv(timeout=30)).type == "model_info"
        (state,) = srv.server.states
        assert len(state.cancelled) <= 1024
    finally:
        client.close()
        srv.stop()


def _stop_all(other, sleeper, srv) -> None:
    """Close the reading tenant and the raw non-reading socket (which the server may have
    dropped already), then stop the server."""
    other.close()
    try:
        sleeper.close()
    except Exception:
        pass
    srv.stop()


def test_results_nobody_reads_are_bounded_and_their_reader_dropped(hosted):
    """A client that submits a request with large results (65 MiB) and stops reading: the
    results queued for it count against its user's memory, which never grows past that
    user's share (the request whose next result would pass it fails), so another tenant's
    requests are still admitted against the server-wide budget; after ``send_timeout_s``
    without progress the reader is dropped, freeing what it held."""
    srv = hs.start(models={"tiny-gpt2": hosted["tiny-gpt2"].bridge}, port=0,
                   api_keys=[KEY_A, KEY_B], limits=Limits(send_timeout_s=5.0,
                                                          max_pending_bytes_per_user=24 * MiB,
                                                          max_pending_bytes_total=32 * MiB))
    from websockets.sync.client import connect
    sleeper = connect(srv.url, additional_headers={"Authorization": f"Bearer {KEY_A}"},
                      max_size=None, max_queue=1, ping_interval=None)
    other = PipelinedClient(srv.url, KEY_B)
    try:
        sleeper.send(json.dumps({"type": "hello", "protocol": 1, "client_version": "t"}))
        sleeper.recv(timeout=30)
        tokens = torch.randint(0, 256, (128, 256))  # 4 saves of 8 MiB, 33 MiB of logits
        graph = read_graph("tiny-gpt2", [(f"blocks.{b}.hook_resid_{kind}", 0)
                                         for b in (0, 1) for kind in ("pre", "post")])
        sleeper.send(json.dumps({"type": "submit", "request_id": "unread", "graph": graph,
                                 "tensors": [header_for("input_ids", tokens).model_dump()],
                                 "keep_results": False}))
        for frame in encode_chunks("unread", "input_ids", tokens):
            sleeper.send(frame)
        peak, deadline = 0, time.monotonic() + 30
        while peak < 8 * MiB and time.monotonic() < deadline:   # the pile builds up
            peak = max(peak, srv.server.memory.pending_total)
            time.sleep(0.05)
        assert peak >= 8 * MiB, peak
        small = {"input_ids": torch.randint(0, 256, (1, 8))}
        for _ in range(5):   # the other tenant, while the results sit unread
            rid = other.send(read_graph("tiny-gpt2", [("blocks.0.hook_resid_pre", 0)]), small)
            answer = other.collect([rid])[rid]
            assert answer.error is None, answer.error
            peak = max(peak, srv.server.memory.pending_total)
            time.sleep(0.2)
        assert peak <= 24 * MiB, peak
        deadline = time.monotonic() + 30  # dropped after send_timeout_s without progress
        while srv.server.memory.pending_total and time.monotonic() < deadline:
            time.sleep(0.1)
        assert srv.server.memory.pending_total == 0
        assert len(srv.server.states) == 1  # only the other connection is left
    finally:
        _stop_all(other, sleeper, srv)


def test_a_request_whose_results_could_not_be_sent_does_not_run(hosted):
    """A client stops reading while its first request's results (six 16 MiB saves) pile up
    to its user's share (24 MiB). Its next request, whose one result (16 MiB) could not be
    sent without passing that share, is refused with ``max_pending_bytes_per_user`` before
    its forward runs -- the worker does not spend a forward on an answer it would refuse
    (before: the forward ran and the result was refused). Another tenant is served as usual,
    and its answer equals the one it gets alone."""
    srv = hs.start(models={"tiny-gpt2": hosted["tiny-gpt2"].bridge}, port=0,
                   api_keys=[KEY_A, KEY_B], limits=Limits(send_timeout_s=120.0,
                                                          max_pending_bytes_per_user=24 * MiB,
                                                          max_pending_bytes_total=64 * MiB))
    from websockets.sync.client import connect
    wte = hosted["tiny-gpt2"].bridge.original_model.transformer.wte
    forwards: list[int] = []  # batch rows of each forward the server's model runs
    counter = wte.register_forward_pre_hook(lambda mod, args: forwards.append(args[0].shape[0]))
    sleeper = connect(srv.url, additional_headers={"Authorization": f"Bearer {KEY_A}"},
                      max_size=None, max_queue=1, ping_interval=None)
    other = PipelinedClient(srv.url, KEY_B)
    small = {"input_ids": torch.randint(0, 256, (1, 8))}
    probe = read_graph("tiny-gpt2", [("blocks.0.hook_resid_pre", 0)])
    try:
        alone_id = other.send(probe, small)
        alone = other.collect([alone_id])[alone_id]
        sleeper.send(json.dumps({"type": "hello", "protocol": 1, "client_version": "t"}))
        sleeper.recv(timeout=30)
        tokens = torch.randint(0, 256, (256, 256))  # each resid save: 256x256x64 fp32 = 16 MiB

        def submit(rid, sites):
            graph = read_graph("tiny-gpt2", sites, return_type=None)
            sleeper.send(json.dumps({"type": "submit", "request_id": rid, "graph": graph,
                                     "tensors": [header_for("input_ids", tokens).model_dump()],
                                     "keep_results": False, "progress": False}))
            for frame in encode_chunks(rid, "input_ids", tokens):
                sleeper.send(frame)

        # Six distinct tensors (none a view of another: each travels): what the sockets'
        # buffers do not absorb piles up, until the next one would pass the share.
        submit("pile", [(f"blocks.{b}.hook_{kind}", 0)
                        for b in (0, 1) for kind in ("resid_mid", "mlp_out", "resid_post")])
        held, steady, deadline = -1, 0, time.monotonic() + 60
        while steady < 10 and time.monotonic() < deadline:  # the pile stops growing
            now = max(srv.server.memory.pending_of(st.user) for st in srv.server.states)
            steady, held = (steady + 1, now) if now == held and now > 8 * MiB else (0, now)
            time.sleep(0.1)
        assert held + 16 * MiB > 24 * MiB, held  # what the next request's check will see
        n_before = len(forwards)
        submit("refused", [("blocks.0.hook_resid_pre", 0)])
        deadline = time.monotonic() + 30
        while srv.server.worker.queue_depth() and time.monotonic() < deadline:
            time.sleep(0.05)
        after_id = other.send(probe, small)  # answered after the refused request was decided
        after = other.collect([after_id])[after_id]
        assert after.error is None, after.error
        torch.testing.assert_close(after.values["blocks.0.hook_resid_pre#0"],
                                   alone.values["blocks.0.hook_resid_pre#0"], rtol=0, atol=0)
        assert all(rows < 256 for rows in forwards[n_before:]), forwards[n_before:]
        errors = {}
        deadline = time.monotonic() + 60
        while "refused" not in errors and time.monotonic() < deadline:
            msg = sleeper.recv(timeout=30)   # reading now drains the pile
            if isinstance(msg, str):
                parsed = parse_server_message(msg)
                if parsed.type == "error":
                    errors[parsed.request_id] = parsed
        refusal = errors["refused"]
        assert refusal.code == "limit_exceeded", refusal
        assert refusal.details.get("rule") == "max_pending_bytes_per_user", refusal
        assert "did not run" in refusal.message
        assert forwards[:n_before].count(256) == 1  # the pile's forward ran, and only it
    finally:
        counter.remove()
        _stop_all(other, sleeper, srv)


def test_a_co_tenants_maximal_graph_uses_none_of_a_requests_deadline(hosted):
    """A tenant's graph of max_nodes nodes, co-batched with a victim's small request: the
    time spent validating and running it counts against neither the victim's deadline nor
    its forward (long graphs run after the light members, alone)."""
    srv = hs.start(models={"tiny-gpt2": hosted["tiny-gpt2"].bridge}, port=0,
                   api_keys=[KEY_A, KEY_B], batch_window_s=1.0,
                   limits=Limits(max_request_seconds=2.0))
    attacker, victim = PipelinedClient(srv.url, KEY_A), PipelinedClient(srv.url, KEY_B)
    site = "blocks.1.hook_resid_post"
    nodes = [{"id": 0, "op": "site.read", "args": [0]}] + [
        {"id": i, "op": "getitem", "args": [{"ref": i - 1}, [{"slice": [None, None, None]},
                                                           -1]]}
        for i in range(1, Limits().max_nodes)]
    huge = {"model": "tiny-gpt2", "inputs": {"input_ids": "input_ids"},
            "sites": [{"name": site, "call": 0}], "nodes": nodes, "saves": {},
            "forward": {"return_type": None}}
    ids = {"input_ids": torch.randint(0, 256, (1, 8))}
    try:
        solo_id = victim.send(read_graph("tiny-gpt2", [(site, 0)]), ids)
        solo = victim.collect([solo_id])[solo_id]
        for _ in range(3):
            a = attacker.send(huge, ids)
            v = victim.send(read_graph("tiny-gpt2", [(site, 0)]), ids)   # in the same batch
            answer = victim.collect([v])[v]
            attacker.collect([a])
            assert answer.error is None, answer.error
            assert equal_values(answer.values, solo.values)
    finally:
        attacker.close()
        victim.close()
        srv.stop()


def test_weights_transfers_to_clients_that_do_not_read_hold_no_shared_thread():
    """A weights transfer ran whole in a thread of the loop's shared executor and slept there
    while its client did not read, so a tenant's few connections asking for weights and
    reading nothing held every thread of it (min(32, cores + 4)) until ``send_timeout_s``
    dropped them, and a co-tenant's weights waited as long (58 s with 8 such connections
    and a 60 s timeout). Now a transfer waits on the loop, holding no thread: the co-tenant's
    128 MiB parameter -- copied and framed a part at a time -- arrives meanwhile, equal to the
    served one."""
    from hookwire.families import build_hf_model
    from hookwire.server.weights import SEND_WINDOW_BYTES
    model, _ = build_hf_model("GPT2LMHeadModel", dict(
        n_layer=1, n_embd=512, n_head=4, n_positions=64, vocab_size=65536), seed=0)
    srv = hs.start(models={"big": model}, port=0, limits=Limits(send_timeout_s=600))
    params = dict(srv.server.entries["big"].hosted.model.named_parameters())
    wte = next(n for n in params if "wte" in n)
    assert params[wte].numel() * 4 == 128 * MiB  # more than the client's and kernels' buffers
    shared_threads = min(32, (os.cpu_count() or 1) + 4)  # the loop's default executor's
    stalled = [PipelinedClient(srv.url) for _ in range(shared_threads + 1)]
    victim = Connection(srv.url)
    try:
        for k, client in enumerate(stalled):  # ... and never read what comes back
            client.ws.send(json.dumps({"type": "weights", "request_id": f"w{k}",
                                       "model": "big", "names": list(params)}))

        def filled() -> int:  # transfers whose frames wait for their client
            return sum(st.queued_bytes >= SEND_WINDOW_BYTES // 2
                       for st in _states_of(srv, stalled))
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and filled() < shared_threads:
            time.sleep(0.05)
        assert filled() >= shared_threads
        time.sleep(0.5)
        got = {}

        def fetch():
            got.update(victim.fetch_weights("big", [wte]).values)
        fetching = threading.Thread(target=fetch)
        fetching.start()
        fetching.join(60)  # (it waited for send_timeout_s, 600 s, before)
        assert not fetching.is_alive(), "a co-tenant's weights waited for the stalled transfers"
        assert torch.equal(got[wte], params[wte].detach())
        # The stalled transfers hold their windows in their users' budgets, and go on
        # when read: one of them, read now, ends with every byte announced.
        counted = {st.user: srv.server.memory.pending_of(st.user)
                   for st in _states_of(srv, stalled[:1])}
        assert all(n >= SEND_WINDOW_BYTES // 2 for n in counted.values()), counted
        total = sum(p.numel() * 4 for p in params.values())
        received, done = 0, None
        while done is None:
            msg = stalled[0].ws.recv(timeout=60)
            if isinstance(msg, bytes):
                received += len(msg)
            elif parse_server_message(msg).type == "done":
                done = parse_server_message(msg)
        assert done.bytes_sent == received and received > total
    finally:
        for client in stalled:  # (a closing handshake would wait behind what they never read)
            client.ws.socket.close()
        victim.close()
        srv.stop()


def test_model_info_probes_are_answered_at_the_front_and_bounded(hosted, local_models):
    """``model_info`` with TL hook switches took a thread of the loop's shared executor each
    and read even an answer probed long before under the model's lock, so while a long
    request ran every such request waited for it, and a tenant sending them queued tasks
    without bound. Now a known answer comes from the front at once, even while a long
    request holds the model; an unknown combination is probed once, and a connection may
    leave at most four unanswered (more: ``QueueFull``), answered in the order asked."""
    from graphs import const, node, ref
    from graphs import graph as make_graph
    from hookwire.server.hook_modes import MAX_PENDING_PER_CONNECTION

    srv = hs.start(models={"tiny-gpt2": hosted["tiny-gpt2"].bridge}, port=0,
                   limits=Limits(max_request_seconds=120))
    known, unknown = ["use_attn_result"], ["use_split_qkv_input"]
    first = Connection(srv.url)
    probed = first.model_info("tiny-gpt2", known)  # probed now, once
    tokens = local_models["tiny-gpt2"].to_tokens(["hello world"])
    c = torch.randn(256, 256, generator=torch.Generator().manual_seed(0)) / 16
    chain = [node(0, "output.read", "logits"), node(1, "sum", ref(0)),
             node(2, "mul", ref(1), 0.0), node(3, "add", const("c"), ref(2))]
    chain += [node(i, "matmul", ref(i - 1), const("c")) for i in range(4, 3000)]
    long_graph = make_graph(nodes=chain, constants=["c"], saves={"y": 2999})
    finished = {}

    def long_request():
        first.run(long_graph, {"input_ids": tokens, "c": c})
        finished["long"] = time.monotonic()

    thread = threading.Thread(target=long_request)
    asker, flood = Connection(srv.url), PipelinedClient(srv.url)
    try:
        thread.start()
        deadline = time.monotonic() + 60
        while not srv.server.worker.current and time.monotonic() < deadline:
            time.sleep(0.001)
        assert srv.server.worker.current
        got = asker.model_info("tiny-gpt2", known)  # a fresh connection: asks the server
        assert thread.is_alive(), "a known answer waited for the long request"
        assert [s.name for s in got.sites] == [s.name for s in probed.sites]
        for _ in range(MAX_PENDING_PER_CONNECTION + 6):
            flood.ws.send(json.dumps({"type": "model_info", "model": "tiny-gpt2",
                                      "tl_flags": unknown}))
        refused = [parse_server_message(flood.ws.recv(timeout=60)) for _ in range(6)]
        assert all(isinstance(m, Error) and m.code == "queue_full" for m in refused), refused
        thread.join(120)
        assert "long" in finished
        infos = [parse_server_message(flood.ws.recv(timeout=60))
                 for _ in range(MAX_PENDING_PER_CONNECTION)]
        assert all(m.type == "model_info" and m.model == "tiny-gpt2" for m in infos), infos
        assert infos[0] == infos[-1]  # probed once, the same answer to each
    finally:
        thread.join(120)
        for client in (first, asker, flood):
            client.close()
        srv.stop()
