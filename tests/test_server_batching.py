"""Co-tenancy: requests from several clients that arrive together run in one batched forward,
each seeing only its own rows and positions, each equal to its solo run; a failing request
fails alone; queues are fair and bounded; the wall-time limit, shutdown with requests
queued and per-key connection limits each end in their own typed error."""
from __future__ import annotations

import json
import threading
import time
import uuid

import pytest
import torch

import hookwire.server as hs
from hookwire.client import Connection
from hookwire.errors import (DeadlineExceeded, ExecutionError, QueueFull, ServerShuttingDown,
                             TooManyConnections)
from hookwire.frames import encode_chunks, header_for
from hookwire.protocol import Done, Error, parse_server_message
from hookwire.server.scheduler import Scheduler
from hookwire.validate import Limits

SITE = "blocks.1.hook_resid_pre"
FULL = {"slice": [None, None, None]}


def last_token_graph(model: str, mode: str, scale: float):
    """Save the request's own last-token residual, then scale that position (in place or by
    returning a new tensor) -- ``act[:, -1]`` must mean *this request's* last token."""
    index = [FULL, -1, FULL]
    nodes = [{"id": 0, "op": "site.read", "args": [0]},
             {"id": 1, "op": "getitem", "args": [{"ref": 0}, index]},
             {"id": 2, "op": "mul", "args": [{"ref": 1}, scale]},
             {"id": 3, "op": "setitem", "args": [{"ref": 0}, index, {"ref": 2}]},
             {"id": 4, "op": "site.write", "args": [0, {"ref": 3}], "kwargs": {"mode": mode}}]
    return {"model": model, "inputs": {"input_ids": "input_ids"},
            "sites": [{"name": SITE}], "nodes": nodes, "saves": {"last": 1},
            "forward": {"return_type": "logits"}}


def local_answer(bridge, tokens, scale):
    seen = {}

    def hook(act, hook):
        seen["last"] = act[:, -1].clone()
        act[:, -1] = act[:, -1] * scale
    with torch.no_grad():
        logits = bridge.run_with_hooks(tokens, fwd_hooks=[(SITE, hook)])
    return logits, seen["last"]


@pytest.fixture(scope="module")
def batching_server(hosted):
    """A server that waits long for batch mates, so concurrent requests surely share one."""
    srv = hs.start(models={n: h.bridge for n, h in hosted.items()}, port=0,
                   batch_window_s=0.3)
    yield srv
    srv.stop()


def run_concurrently(url, requests):
    """requests: [(graph, tensors)]; each on its own connection, all at once."""
    results = [None] * len(requests)
    barrier = threading.Barrier(len(requests))

    def one(i, graph, tensors):
        conn = Connection(url)
        try:
            barrier.wait()
            try:
                results[i] = conn.run(graph, tensors)
            except Exception as exc:
                results[i] = exc
        finally:
            conn.close()
    threads = [threading.Thread(target=one, args=(i, g, t)) for i, (g, t) in enumerate(requests)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    return results


@pytest.mark.parametrize("model", ["tiny-gpt2", "tiny-llama"])
def test_concurrent_requests_share_a_forward_and_equal_their_solo_runs(
        batching_server, local_models, model):
    bridge = local_models[model]
    texts = [["hello world"], ["a much longer prompt than the others", "and its twin!"],
             ["short"], ["medium sized text", "second row here."]]
    requests, expected = [], []
    for i, batch in enumerate(texts):
        tokens = bridge.to_tokens(batch)
        scale = 0.5 + i
        mode = "inplace" if i % 2 else "replace"
        requests.append((last_token_graph(model, mode, scale), {"input_ids": tokens}))
        expected.append(local_answer(bridge, tokens, scale))
    results = run_concurrently(batching_server.url, requests)
    sizes = []
    for result, (logits, last) in zip(results, expected):
        assert not isinstance(result, Exception), result
        torch.testing.assert_close(result.values["__logits__"], logits)
        torch.testing.assert_close(result.values["last"], last)
        sizes.append(result.timings["batch_size"])
    assert max(sizes) > 1, f"no two requests shared a forward: {sizes}"


def test_a_failing_request_does_not_fail_its_batch_mates(batching_server, local_models):
    bridge = local_models["tiny-gpt2"]
    tokens = bridge.to_tokens(["hello world", "other text!"])
    bad = {"model": "tiny-gpt2", "inputs": {"input_ids": "input_ids"}, "constants": ["c0"],
           "sites": [{"name": SITE}],
           "nodes": [{"id": 0, "op": "site.read", "args": [0]},
                     {"id": 1, "op": "index_select", "args": [{"ref": 0}, 1, {"const": "c0"}]}],
           "saves": {"x": 1}, "forward": {"return_type": "logits"}}
    requests = [(last_token_graph("tiny-gpt2", "replace", 2.0), {"input_ids": tokens}),
                (bad, {"input_ids": tokens, "c0": torch.tensor([10_000])}),
                (last_token_graph("tiny-gpt2", "inplace", 3.0), {"input_ids": tokens})]
    results = run_concurrently(batching_server.url, requests)
    assert isinstance(results[1], ExecutionError)
    for i, scale in ((0, 2.0), (2, 3.0)):
        logits, last = local_answer(bridge, tokens, scale)
        torch.testing.assert_close(results[i].values["__logits__"], logits)
        torch.testing.assert_close(results[i].values["last"], last)
    assert max(results[0].timings["batch_size"], results[2].timings["batch_size"]) > 1


def test_scheduler_is_round_robin_across_users():
    sched = Scheduler(max_queued_per_user=100, window_s=0.0, max_rows=3, max_tokens=10**6)
    for i in range(6):
        sched.put(("greedy", i), "greedy")
    sched.put(("polite", 0), "polite")
    sched.put(("other", 0), "other")
    key, size = (lambda job: "same"), (lambda job: 1)
    first = sched.next_batch(key, size, size)
    # One per user per turn: the two small users are in the very first batch.
    assert first == [("greedy", 0), ("polite", 0), ("other", 0)]
    assert sched.next_batch(key, size, size) == [("greedy", 1), ("greedy", 2), ("greedy", 3)]
    with pytest.raises(QueueFull):
        small = Scheduler(max_queued_per_user=1, window_s=0.0, max_rows=3, max_tokens=100)
        small.put("a", "u")
        small.put("b", "u")


def test_the_user_served_least_recently_goes_first():
    """The user whose last batch finished longest ago goes first: a request that arrives
    while a co-tenant's long batch runs -- its user served meanwhile inside that batch, as
    a long forward gives way -- goes before the co-tenant's next one. (Before: rotation order
    put it behind, its user having left the rotation when its queue emptied, so it waited
    for the co-tenant's next long forward to start too.)"""
    sched = Scheduler(max_queued_per_user=100, window_s=0.0, max_rows=1, max_tokens=10**6)
    key, size = (lambda job: "same"), (lambda job: 1)
    others = lambda job: not job.startswith("g")  # noqa: E731  (as GiveWay.light)
    for i in range(3):
        sched.put(f"g{i}", "greedy")
    assert sched.next_batch(key, size, size) == ["g0"]  # a long batch; while it runs:
    sched.put("v0", "victim")
    assert sched.take_now(others, key, size, size) == ["v0"]  # served inside it
    sched.finished(["victim"])
    sched.put("v1", "victim")
    sched.finished(["greedy"])  # the long batch ends
    assert sched.next_batch(key, size, size) == ["v1"]
    sched.finished(["victim"])
    assert sched.next_batch(key, size, size) == ["g1"]


def test_the_batch_window_ends_when_no_mate_can_come():
    """``may_join`` says whether a request not queued yet could still join: while it says
    yes the scheduler waits (here: until a mate arrives), once it says no the batch goes at
    once -- a 60 s window is not waited out."""
    sched = Scheduler(max_queued_per_user=10, window_s=60.0, max_rows=8, max_tokens=10**6)
    key, size = (lambda job: "same"), (lambda job: 1)
    asked, out = [], []
    sched.put("a", "u1")
    thread = threading.Thread(target=lambda: out.append(sched.next_batch(
        key, size, size, may_join=lambda queued: (asked.append(list(queued)), False)[1])))
    thread.start()
    thread.join(30)
    assert not thread.is_alive(), "the window was waited out with no mate possible"
    assert out == [["a"]] and asked == [["a"]]
    # A mate that may come is waited for, and joins the batch when it does.
    expecting = threading.Event()
    expecting.set()
    sched.put("b", "u1")
    thread = threading.Thread(target=lambda: out.append(sched.next_batch(
        key, size, size, may_join=lambda queued: expecting.is_set())))
    thread.start()
    time.sleep(0.3)
    assert thread.is_alive(), "the batch went while a mate could still come"
    expecting.clear()
    sched.put("c", "u2")  # the mate: it wakes the scheduler, which now sees nobody else
    thread.join(30)
    assert not thread.is_alive() and out[1] == ["b", "c"]
    sched.close()


def test_a_lone_caller_does_not_wait_out_the_batch_window(hosted, local_models):
    """One connection, nothing else connected: its requests run at once, even with a
    batch window of a minute (they would otherwise each wait it out); a request from a
    second connection that sends while the first waits still shares its forward."""
    bridge = local_models["tiny-gpt2"]
    tokens = bridge.to_tokens(["hello world"])
    srv = hs.start(models={"tiny-gpt2": hosted["tiny-gpt2"].bridge}, port=0,
                   batch_window_s=60.0)
    conn = Connection(srv.url)
    try:
        for scale in (2.0, 3.0):
            rid = _submit_raw(conn, last_token_graph("tiny-gpt2", "replace", scale),
                              {"input_ids": tokens})
            finals = _finals(conn, {rid}, timeout=30)  # (the window is 60 s)
            assert isinstance(finals.get(rid), Done), finals
            assert finals[rid].timings["batch_size"] == 1.0
        conn.close()
        # Two connections, requests sent together: they still share one forward (the one
        # that arrives first waits for the other, connected and silent), and each equals
        # its solo run.
        results = run_concurrently(srv.url, [
            (last_token_graph("tiny-gpt2", "replace", 2.0), {"input_ids": tokens}),
            (last_token_graph("tiny-gpt2", "inplace", 3.0), {"input_ids": tokens})])
        for result, scale in zip(results, (2.0, 3.0)):
            assert not isinstance(result, Exception), result
            assert result.timings["batch_size"] == 2.0
            logits, last = local_answer(bridge, tokens, scale)
            torch.testing.assert_close(result.values["__logits__"], logits)
            torch.testing.assert_close(result.values["last"], last)
    finally:
        conn.close()
        srv.stop()


def test_the_batch_window_learns_which_connections_call_one_request_at_a_time(
        hosted, local_models):
    """A connection that has sent SEQUENTIAL_AFTER requests, none beside another
    connection's, is not waited for: a sequential caller next to it runs at once, even with
    a batch window of a minute (which the suite's single-client timings used to pay on a
    server with idle connections). Once their requests do arrive together, they are waited
    for again and share a forward, each equal to its solo run."""
    from hookwire.server.app import SEQUENTIAL_AFTER
    bridge = local_models["tiny-gpt2"]
    tokens = bridge.to_tokens(["hello world"])
    graph = last_token_graph("tiny-gpt2", "replace", 2.0)
    srv = hs.start(models={"tiny-gpt2": hosted["tiny-gpt2"].bridge}, port=0,
                   batch_window_s=60.0)
    first = Connection(srv.url)
    second = None
    try:
        for _ in range(SEQUENTIAL_AFTER):  # alone on the server: never a window
            first.run(graph, {"input_ids": tokens})
        second = Connection(srv.url)
        for _ in range(SEQUENTIAL_AFTER):  # ``first``, known to be sequential, is not waited for
            assert second.run(graph, {"input_ids": tokens}).timings["batch_size"] == 1.0
        # Both just active (a cancel of nothing is a message like any other), both known to
        # send one request at a time: the window would not wait for either.
        seen = time.monotonic()
        first.cancel("nothing-to-cancel")
        second.cancel("nothing-to-cancel")
        deadline = time.monotonic() + 30
        while any(state.last_active < seen for state in list(srv.server.states)):
            assert time.monotonic() < deadline, "the server never read the two messages"
            time.sleep(0.01)
        assert not srv.server.mates_possible([])
        # Requests sent together: the one that arrives beside the other's marks its
        # connection as one that may send a mate, and from then on they are batched.
        logits, last = local_answer(bridge, tokens, 2.0)
        batched = []
        for _ in range(4):
            barrier, results = threading.Barrier(2), [None, None]

            def one(i, conn):
                barrier.wait()
                results[i] = conn.run(graph, {"input_ids": tokens})
            threads = [threading.Thread(target=one, args=(i, c))
                       for i, c in enumerate((first, second))]
            for t in threads:
                t.start()
            for t in threads:
                t.join(120)
            for result in results:
                torch.testing.assert_close(result.values["__logits__"], logits)
                torch.testing.assert_close(result.values["last"], last)
            batched.append([r.timings["batch_size"] for r in results])
        assert [2.0, 2.0] in batched, batched
    finally:
        first.close()
        if second is not None:
            second.close()
        srv.stop()


def _submit_raw(conn, graph, tensors):
    rid = f"raw-{uuid.uuid4().hex[:8]}"
    conn.ws.send(json.dumps({"type": "submit", "request_id": rid, "graph": graph,
                             "tensors": [header_for(t, v).model_dump()
                                         for t, v in tensors.items()]}))
    for tid, value in tensors.items():
        for frame in encode_chunks(rid, tid, value):
            conn.ws.send(frame)
    return rid


def _finals(conn, rids, timeout=60):
    """request id -> its final message (done or error); fails on a second final."""
    finals = {}
    deadline = time.monotonic() + timeout
    while len(finals) < len(rids) and time.monotonic() < deadline:
        data = conn.ws.recv(timeout=max(0.1, deadline - time.monotonic()))
        if isinstance(data, bytes):
            continue
        msg = parse_server_message(data)
        if isinstance(msg, (Done, Error)) and msg.request_id in rids:
            assert msg.request_id not in finals, "two final answers for one request"
            finals[msg.request_id] = msg
    return finals


def test_queue_limit_wall_time_and_shutdown(hosted, local_models):
    """Per-user queue limit -> queue_full; over the wall-time limit -> deadline_exceeded;
    stopping with requests queued -> server_shutting_down for each; every request answered
    exactly once."""
    tokens = local_models["tiny-gpt2"].to_tokens(["hello world"])
    graph = last_token_graph("tiny-gpt2", "replace", 2.0)
    srv = hs.start(models={"tiny-gpt2": hosted["tiny-gpt2"].bridge}, port=0,
                   batch_window_s=1.0, batching=True,
                   limits=Limits(max_queued_per_user=3, max_request_seconds=0.0))
    conn = Connection(srv.url)
    idle = None
    # The batch window waits only while a batch mate may still come: another connection,
    # just opened (recently active, nothing queued), keeps it open, so the six requests
    # queue up instead of running one by one as they arrive.
    first_idle = Connection(srv.url)
    try:
        rids = [_submit_raw(conn, graph, {"input_ids": tokens}) for _ in range(6)]
        finals = _finals(conn, set(rids))
        codes = sorted(m.code if isinstance(m, Error) else "done" for m in finals.values())
        assert len(finals) == 6
        assert codes.count(QueueFull.code) >= 2
        assert codes.count(DeadlineExceeded.code) >= 1  # those that ran hit the limit
        # Now queue some and stop the server before the batch window closes. The window
        # waits only while a batch mate may still come: another connection, just opened
        # (recently active, nothing queued), keeps it open.
        idle = Connection(srv.url)
        rids = [_submit_raw(conn, graph, {"input_ids": tokens}) for _ in range(2)]
        time.sleep(0.2)
    finally:
        stopper = threading.Thread(target=srv.stop)
        stopper.start()
    try:
        finals = _finals(conn, set(rids), timeout=30)
        assert set(finals) == set(rids)
        for msg in finals.values():
            assert isinstance(msg, Error)
            assert msg.code in (ServerShuttingDown.code, DeadlineExceeded.code)
        assert any(m.code == ServerShuttingDown.code for m in finals.values())
    finally:
        stopper.join(60)
        conn.close()
        first_idle.close()
        if idle is not None:
            idle.close()


def test_connections_per_key_are_limited(hosted):
    srv = hs.start(models={"tiny-gpt2": hosted["tiny-gpt2"].bridge}, port=0,
                   api_keys=["key-one-0123456789ab"], limits=Limits(max_connections_per_user=1))
    first = Connection(srv.url, "key-one-0123456789ab")
    try:
        with pytest.raises(TooManyConnections):
            Connection(srv.url, "key-one-0123456789ab")
        first.close()
        time.sleep(0.2)
        Connection(srv.url, "key-one-0123456789ab").close()  # the slot is free again
    finally:
        srv.stop()


SCORES = "blocks.0.attn.hook_attn_scores"
PAD_KEYS = ("pad-key-a-0123456789abcdef", "pad-key-b-0123456789abcdef")


def ablate_scores_graph(model: str) -> dict:
    """Fill the scores of every head with the attention mask's own value (finfo.min), as an
    ablation does: solo, each position attends uniformly to the positions up to its own
    (and locally, as TL does)."""
    floor = torch.finfo(torch.float32).min
    return {"model": model, "inputs": {"input_ids": "input_ids"},
            "sites": [{"name": SCORES}],
            "nodes": [{"id": 0, "op": "site.read", "args": [0]},
                      {"id": 1, "op": "mul", "args": [{"ref": 0}, 0.0]},
                      {"id": 2, "op": "add", "args": [{"ref": 1}, floor]},
                      {"id": 3, "op": "site.write", "args": [0, {"ref": 2}],
                       "kwargs": {"mode": "replace"}}],
            "saves": {}, "forward": {"return_type": "logits"}}


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-llama"])
def test_a_member_that_writes_attention_scores_is_not_right_padded(hosted, local_models,
                                                                   name):
    """Right-padded beside a longer batch mate, a member's view of the scores leaves out the
    padding keys, which the causal mask leaves at finfo.min: its own keys written down to
    that value no longer outrank them, and its positions attended to the padding (logits
    off by ~0.1; with -inf, finite where solo is NaN). Such a writer shares a forward only
    where it is not padded: beside a shorter mate it still does, and equals its solo run."""
    from pipelined import PipelinedClient
    bridge = local_models[name]
    short = bridge.to_tokens(["short one"])
    long = bridge.to_tokens(["a longer request that the short one is padded to"])
    floor = torch.finfo(torch.float32).min
    with torch.no_grad():
        local = {len_: bridge.run_with_hooks(toks, fwd_hooks=[
            (SCORES, lambda x, hook: x * 0.0 + floor)]) for len_, toks in
            (("short", short), ("long", long))}
    srv = hs.start(models={name: hosted[name].bridge}, port=0, api_keys=list(PAD_KEYS),
                   batch_window_s=0.05)
    a, b = PipelinedClient(srv.url, PAD_KEYS[0]), PipelinedClient(srv.url, PAD_KEYS[1])
    try:
        writer, reader = ablate_scores_graph(name), {
            "model": name, "inputs": {"input_ids": "input_ids"}, "sites": [], "nodes": [],
            "saves": {}, "forward": {"return_type": "logits"}}
        solo = {}
        for tag, toks in (("short", short), ("long", long)):
            rid = a.send(writer, {"input_ids": toks})
            solo[tag] = a.collect([rid])[rid]
            assert solo[tag].error is None and solo[tag].batch_size == 1
            assert torch.equal(solo[tag].values["__logits__"], local[tag]), tag
        # The short writer beside a long reader: never padded, so never co-batched.
        for _ in range(4):
            w = a.send(writer, {"input_ids": short})
            r = b.send(reader, {"input_ids": long})
            wa, ra = a.collect([w])[w], b.collect([r])[r]
            assert wa.error is None and ra.error is None
            assert torch.equal(wa.values["__logits__"], solo["short"].values["__logits__"])
            assert wa.batch_size == 1, "a scores writer was right-padded"
        # The long writer beside a short reader is not padded: it shares the forward.
        wa, ra = _pair_of_lengths(a, b, writer, reader, long, short)
        assert wa.error is None and ra.error is None and wa.batch_size == 2
        assert torch.equal(wa.values["__logits__"], solo["long"].values["__logits__"])
    finally:
        a.close()
        b.close()
        srv.stop()


def _pair_of_lengths(writer, reader, wgraph, rgraph, wtokens, rtokens, tries: int = 6):
    for _ in range(tries):
        w = writer.send(wgraph, {"input_ids": wtokens})
        r = reader.send(rgraph, {"input_ids": rtokens})
        wa, ra = writer.collect([w])[w], reader.collect([r])[r]
        if wa.batch_size == 2:
            break
    return wa, ra


MLP_POST = "blocks.0.mlp.hook_post"


def broadcast_replacement_graph() -> dict:
    """Replace GPT-2's MLP hidden activation with its first position broadcast over the
    sequence (``x[:, :1].expand_as(x)``: one row of memory). The output projection, a
    Conv1D, takes ``x.view(-1, d)`` of it, which torch refuses for that layout."""
    first = [FULL, {"slice": [0, 1, None]}, FULL]
    return {"model": "tiny-gpt2", "inputs": {"input_ids": "input_ids"},
            "sites": [{"name": MLP_POST}],
            "nodes": [{"id": 0, "op": "site.read", "args": [0]},
                      {"id": 1, "op": "getitem", "args": [{"ref": 0}, first]},
                      {"id": 2, "op": "expand_as", "args": [{"ref": 1}, {"ref": 0}]},
                      {"id": 3, "op": "site.write", "args": [0, {"ref": 2}],
                       "kwargs": {"mode": "replace"}}],
            "saves": {}, "forward": {"return_type": "logits"}}


def test_a_replacement_the_batch_would_lay_out_anew_runs_as_it_does_solo(hosted, local_models,
                                                                          monkeypatch):
    """Solo (and in TL) the forward goes on with the replacement itself, whose layout the
    model's ``view`` refuses: an error. A batch copied it into the member's rows of a
    contiguous tensor, and a value came back where solo an error did. Now the shared
    forward stops there and its members run again without each other."""
    from pipelined import PipelinedClient, record_retries
    bridge = local_models["tiny-gpt2"]
    tokens = bridge.to_tokens(["one row broadcast over all", "in each of two rows"])
    with torch.no_grad(), pytest.raises(RuntimeError, match="view size is not compatible"):
        bridge.run_with_hooks(tokens, fwd_hooks=[
            (MLP_POST, lambda x, hook: x[:, :1].expand_as(x))])
    bridge.reset_hooks(including_permanent=True)
    retries = record_retries(monkeypatch)
    srv = hs.start(models={"tiny-gpt2": hosted["tiny-gpt2"].bridge}, port=0,
                   api_keys=list(PAD_KEYS), batch_window_s=0.05)
    a, b = PipelinedClient(srv.url, PAD_KEYS[0]), PipelinedClient(srv.url, PAD_KEYS[1])
    try:
        writer = broadcast_replacement_graph()
        reader = {"model": "tiny-gpt2", "inputs": {"input_ids": "input_ids"},
                  "sites": [{"name": MLP_POST}],
                  "nodes": [{"id": 0, "op": "site.read", "args": [0]}],
                  "saves": {"post": 0}, "forward": {"return_type": "logits"}}
        rid = a.send(writer, {"input_ids": tokens})
        solo = a.collect([rid])[rid]
        assert solo.error is not None and "view size" in solo.error.message
        rid = b.send(reader, {"input_ids": tokens})
        reader_solo = b.collect([rid])[rid]
        assert reader_solo.error is None
        for _ in range(4):
            w = a.send(writer, {"input_ids": tokens})
            r = b.send(reader, {"input_ids": tokens})
            wa, ra = a.collect([w])[w], b.collect([r])[r]
            assert wa.error is not None, "co-batched, the broadcast replacement ran"
            assert wa.error.message == solo.error.message
            assert ra.error is None
            for k in ("post", "__logits__"):
                assert torch.equal(ra.values[k], reader_solo.values[k]), k
            assert wa.batch_size in (0, 1) and ra.batch_size == 1
        # Validation traced the broadcast replacement: the member runs alone from the start,
        # no shared forward is begun and stopped (LayoutNotShared) for it.
        assert not retries, retries
    finally:
        a.close()
        b.close()
        srv.stop()
