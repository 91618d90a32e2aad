"""Values that stay on the server: a patching sweep refers to the clean cache instead of
re-sending it; edited tensors, expired values and other users' ids fall back or fail cleanly;
results always equal local TL."""
from __future__ import annotations

import functools
import json
import time
import uuid

import pytest
import torch

from engines import ALSO_OUT_OF_PROCESS

import hookwire.server as hs
from hookwire.client import Connection, close_connections, get_connection
from hookwire.errors import ProtocolError, ResidentMissing
from hookwire.frames import encode_chunks, header_for
from hookwire.protocol import Error, parse_server_message
from hookwire.residents import content_id
from hookwire.validate import Limits

RESID = "blocks.{}.hook_resid_pre"


def patch_position(resid, hook, pos, clean_resid):
    resid[:, pos, :] = clean_resid[:, pos, :]


def sweep(model, clean_cache, corrupt, positions, remote):
    """Residual patching over layers x positions, reading the clean cache (the TL way)."""
    kw = {"remote": remote, "progress": False} if remote else {}
    out = []
    for layer in range(model.cfg.n_layers):
        for pos in positions:
            hook = functools.partial(patch_position, pos=pos,
                                     clean_resid=clean_cache[RESID.format(layer)])
            logits = model.run_with_hooks(corrupt, fwd_hooks=[(RESID.format(layer), hook)], **kw)
            out.append(logits[:, -1])
    return torch.stack(out)


def is_resid(name):
    return name.endswith("hook_resid_pre")


@ALSO_OUT_OF_PROCESS
@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-llama"])
def test_sweep_refers_to_the_clean_cache_instead_of_uploading(local_models, remote_models,
                                                              clean_corrupt_tokens, name):
    clean, corrupt = clean_corrupt_tokens
    local, remote = local_models[name], remote_models[name]
    with torch.no_grad():
        _, local_cache = local.run_with_cache(clean, names_filter=is_resid)
        expected = sweep(local, local_cache, corrupt, range(clean.shape[1]), remote=False)
    _, remote_cache = remote.run_with_cache(clean, names_filter=is_resid)
    conn = get_connection()
    before = (conn.stats.tensor_bytes_sent, conn.stats.tensors_referenced)
    got = sweep(remote, remote_cache, corrupt, range(clean.shape[1]), remote=True)
    torch.testing.assert_close(got, expected)
    uploaded = conn.stats.tensor_bytes_sent - before[0]
    referenced = conn.stats.tensors_referenced - before[1]
    calls = remote.cfg.n_layers * clean.shape[1]
    # Without residents every call uploads its token ids and its slice of the clean cache.
    patch_bytes = clean.shape[0] * remote.cfg.d_model * 4
    without = calls * (corrupt.numel() * 8 + patch_bytes)
    assert referenced >= 2 * calls - 1          # the cache slice always; tokens after call 1
    assert uploaded <= corrupt.numel() * 8      # at most the corrupt tokens, once
    assert uploaded <= 0.01 * without


def test_edited_cache_values_are_uploaded_not_referred_to(local_models, remote_models,
                                                          clean_corrupt_tokens):
    clean, corrupt = clean_corrupt_tokens
    local, remote = local_models["tiny-gpt2"], remote_models["tiny-gpt2"]
    _, remote_cache = remote.run_with_cache(clean, names_filter=is_resid)
    with torch.no_grad():
        _, local_cache = local.run_with_cache(clean, names_filter=is_resid)
    for cache in (remote_cache, local_cache):
        cache[RESID.format(1)][:, 2:5] *= -3.0     # an in-place edit, through a view
    conn = get_connection()
    before = conn.stats.tensor_bytes_sent
    got = sweep(remote, remote_cache, corrupt, [3], remote=True)
    with torch.no_grad():
        expected = sweep(local, local_cache, corrupt, [3], remote=False)
    torch.testing.assert_close(got, expected)
    # Layer 1's cache entry changed since it arrived: its slice travels as bytes.
    assert conn.stats.tensor_bytes_sent - before >= clean.shape[0] * remote.cfg.d_model * 4


def test_expired_values_are_uploaded_again(local_models, hosted, clean_corrupt_tokens):
    """A server that keeps almost nothing: every reference misses, the client re-sends the
    bytes, and the results are still right."""
    clean, corrupt = clean_corrupt_tokens
    srv = hs.start(models={"tiny-gpt2": hosted["tiny-gpt2"].bridge}, port=0,
                   limits=Limits(resident_ttl_s=0.0))
    try:
        local = local_models["tiny-gpt2"]
        url = srv.url
        _, cache = local.run_with_cache(clean, names_filter=is_resid, remote=url)
        with torch.no_grad():
            _, local_cache = local.run_with_cache(clean, names_filter=is_resid)
            expected = sweep(local, local_cache, corrupt, [1, 4], remote=False)
        conn = get_connection(url)
        got = sweep(local, cache, corrupt, [1, 4], remote=url)
        torch.testing.assert_close(got, expected)
        assert conn.stats.resident_misses >= 1
    finally:
        close_connections()
        srv.stop()


def _raw_submit(conn: Connection, refs=(), tensors=None, keep=None, graph=None):
    rid = f"raw-{uuid.uuid4().hex[:8]}"
    tensors = tensors or {}
    graph = graph or {"model": "tiny-gpt2", "inputs": {"input_ids": "input_ids"},
                      "constants": [r["tid"] for r in refs if r["tid"] != "input_ids"],
                      "sites": [], "nodes": [], "forward": {"return_type": "logits"}}
    conn.ws.send(json.dumps({"type": "submit", "request_id": rid, "graph": graph,
                             "tensors": [header_for(t, v).model_dump()
                                         for t, v in tensors.items()],
                             "refs": list(refs), "keep": keep or {}}))
    for tid, value in tensors.items():
        for frame in encode_chunks(rid, tid, value):
            conn.ws.send(frame)
    while True:
        data = conn.ws.recv(timeout=30)
        if isinstance(data, bytes):
            continue
        msg = parse_server_message(data)
        if msg.type in ("error", "done"):
            return msg


def test_other_users_values_and_bad_references_are_refused(hosted, tokens):
    """With API keys, a user's store is theirs alone; references are checked against the
    resident's dtype and extent; a connection survives every refusal."""
    srv = hs.start(models={"tiny-gpt2": hosted["tiny-gpt2"].bridge}, port=0,
                   api_keys=["alice-key-0123456789", "bob-key-0123456789ab"])
    alice = Connection(srv.url, "alice-key-0123456789")
    bob = Connection(srv.url, "bob-key-0123456789ab")
    try:
        graph = {"model": "tiny-gpt2", "inputs": {"input_ids": "input_ids"},
                 "sites": [{"name": "blocks.0.hook_resid_pre"}],
                 "nodes": [{"id": 0, "op": "site.read", "args": [0]}], "saves": {"r": 0},
                 "forward": {"return_type": None}}
        result = alice.run(graph, {"input_ids": tokens})
        resid = result.values["r"]
        vid = alice.residents.ref_for(resid)["resident"]
        ref = {"tid": "input_ids", "resident": vid, "dtype": "float32",
               "shape": list(resid.shape), "stride": list(resid.stride()), "offset": 0}
        # Bob cannot read Alice's value: to him it does not exist.
        msg = _raw_submit(bob, refs=[ref])
        assert isinstance(msg, Error) and msg.code == ResidentMissing.code
        assert vid in msg.details["missing"]
        # Alice's own reference, with a view that runs past the value's end / wrong dtype.
        for bad in ({"offset": resid.numel()}, {"dtype": "int64"},
                    {"stride": [-1] + list(resid.stride())[1:]}):
            msg = _raw_submit(alice, refs=[{**ref, **bad}])
            assert isinstance(msg, Error) and msg.code in (ProtocolError.code, "protocol_error")
        # A kept upload whose content id does not match its bytes is refused, not stored.
        t = torch.arange(100, dtype=torch.float32)
        wrong = content_id(t + 1)
        msg = _raw_submit(alice, tensors={"input_ids": tokens, "c0": t}, keep={"c0": wrong},
                          graph={**graph, "constants": ["c0"]})
        assert isinstance(msg, Error) and "content id" in msg.message
        # Both connections still work.
        for conn in (alice, bob):
            again = conn.run(graph, {"input_ids": tokens})
            torch.testing.assert_close(again.values["r"], resid)
    finally:
        alice.close()
        bob.close()
        srv.stop()


@ALSO_OUT_OF_PROCESS
def test_a_referenced_value_used_as_the_activation_stays_intact(local_models, remote_models,
                                                                 tokens):
    """A hook returns a cached tensor as the activation, so the model goes on from it: the
    server works on a copy of the resident value, so every later reference sees the
    original, and each run equals local."""
    local, remote = local_models["tiny-gpt2"], remote_models["tiny-gpt2"]
    _, cache = remote.run_with_cache(tokens, names_filter=is_resid)
    clean = cache[RESID.format(1)]
    kept = clean.clone()
    with torch.no_grad():
        expected = local.run_with_hooks(tokens, fwd_hooks=[
            (RESID.format(1), lambda act, hook: kept.clone())])
    conn = get_connection()
    for _ in range(3):
        before = conn.stats.tensors_referenced
        got = remote.run_with_hooks(tokens, fwd_hooks=[
            (RESID.format(1), lambda act, hook: clean)])
        torch.testing.assert_close(got, expected)
        assert conn.stats.tensors_referenced > before
    torch.testing.assert_close(clean, kept)


@pytest.mark.parametrize("shape, stride, offset", [
    ([(64 << 20) // 4], [0], 3),          # one stride-0 row of 64 MiB: split into chunks
    ([3, (8 << 20) // 4], [1, 0], 1),     # rows larger than a chunk, each split again
    ([4096, 300], [300, 1], 0),           # many small rows: slabs of rows
    ([600, 2, 1000], [0, 1000, 1], 5),    # expanded along the leading dim
    ([], [], 7),                          # a scalar
    ([0, 5], [5, 1], 0),                  # empty
])
def test_views_materialised_in_chunks_equal_their_clone(shape, stride, offset):
    """The worker copies a referenced view a chunk at a time, giving way in between
    (server/residents.materialize_refs): the copy equals the view's clone, and the hook between
    chunks runs once per chunk of at most COPY_CHUNK_BYTES."""
    from types import SimpleNamespace

    from hookwire.server.residents import COPY_CHUNK_BYTES, materialize_refs
    base = torch.randn(4096 * 300, generator=torch.Generator().manual_seed(0))
    ref = SimpleNamespace(shape=shape, stride=stride, offset=offset)
    calls = []
    got = materialize_refs([("t", base, ref)], between=lambda: calls.append(1))["t"]
    want = base.as_strided(shape, stride, offset).clone()
    assert got.shape == want.shape and got.is_contiguous()
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    nbytes = want.numel() * want.element_size()
    assert len(calls) >= max(1, -(-nbytes // COPY_CHUNK_BYTES))
    assert len(calls) <= max(1, 4 * -(-nbytes // COPY_CHUNK_BYTES))


def test_a_kept_upload_is_not_changed_by_its_own_requests_in_place_write(hosted):
    """The client keeps every upload of >= 256 bytes under its content id and later refers to
    it instead of sending the bytes again. The server used to store the uploaded tensor
    itself and then run the request on that very object: an in-place write into the tokens
    site (or into an activation aliasing a kept constant) edited the stored value, and the
    same prompt sent again by reference ran on other tokens than its content id names.
    (Found by a review, seventeenth session.)"""
    from graphs import graph, node, read_graph, ref
    from pipelined import PipelinedClient

    srv = hs.start(models={"tiny-gpt2": hosted["tiny-gpt2"].bridge}, port=0)
    client = PipelinedClient(srv.url)
    try:
        tokens = torch.arange(1, 41, dtype=torch.int64)[None]  # 320 bytes: kept by clients
        cid = content_id(tokens)
        patch = graph("tiny-gpt2", [node(0, "site.read", 0), node(1, "full_like", ref(0), 7),
                                    node(2, "site.write", 0, ref(1), mode="inplace")],
                      ["embed.hook_in"], return_type="logits")
        rid = client.send(patch, {"input_ids": tokens}, keep={"input_ids": cid})
        assert client.collect([rid])[rid].error is None
        # The same prompt again, by reference (what hookwire's client sends the second time).
        client.ws.send(json.dumps({
            "type": "submit", "request_id": "again", "keep_results": False, "tensors": [],
            "graph": read_graph("tiny-gpt2", ["embed.hook_in"], names=["ids"],
                                return_type=None),
            "refs": [{"tid": "input_ids", "resident": cid, "dtype": "int64",
                      "shape": [1, 40], "stride": [40, 1], "offset": 0}]}))
        again = client.collect(["again"])["again"]
        assert again.error is None, again.error
        assert torch.equal(again.values["ids"], tokens), \
            f"resident {cid} now holds {again.values['ids'].tolist()}"
    finally:
        client.close()
        srv.stop()


def test_values_dropped_while_a_queued_request_refers_to_them_stay_counted(hosted):
    """A request that refers to a resident value holds it from its submit until it runs
    (``check_refs``). A user who then lets the value expire (or evicts or replaces it) used
    to leave it held and counted nowhere: a queue of such requests, each holding a value of
    up to the user's whole quota, was memory no limit bounded. Now a dropped value's bytes
    stay counted against its user's store (and the server-wide total) until the last
    request holding it is done, and the request still runs equal to local torch."""
    import threading

    from graphs import const, graph, node
    from pipelined import PipelinedClient

    from hookwire.validate import Limits

    bridge = hosted["tiny-gpt2"].bridge
    srv = hs.start(models={"tiny-gpt2": bridge}, port=0,
                   limits=Limits(max_resident_bytes=1 << 20, resident_ttl_s=0.5))
    user, other = PipelinedClient(srv.url), PipelinedClient(srv.url)
    release = threading.Event()

    def hold(module, args):  # the other user's forward holds the worker until released
        release.wait(60)

    handle = None
    try:
        tokens = torch.randint(0, 256, (1, 4), generator=torch.Generator().manual_seed(3))
        value = torch.arange(65536, dtype=torch.float32)  # 256 KiB, kept by the first request
        cid = content_id(value)
        plain = graph("tiny-gpt2", return_type="logits")
        rid = user.send({**plain, "constants": ["c0"]}, {"input_ids": tokens, "c0": value},
                        keep={"c0": cid})
        assert user.collect([rid])[rid].error is None
        stores = [st for st in srv.server.residents._stores.values() if len(st)]
        assert len(stores) == 1 and stores[0].bytes == value.numel() * 4
        store = stores[0]  # the user's
        handle = bridge.blocks[0].register_forward_pre_hook(hold)
        held = other.send(plain, {"input_ids": tokens})
        deadline = time.monotonic() + 30
        while not srv.server.worker.current and time.monotonic() < deadline:
            time.sleep(0.005)
        # Queued behind it: a request of the user reading element 7 of its value.
        reads = graph("tiny-gpt2", [node(0, "mul", const("c0"), 2.0)], saves={"x": 0},
                      constants=["c0"], return_type=None)
        queued = user.send(reads, {"input_ids": tokens},
                           refs=[{"tid": "c0", "resident": cid, "dtype": "float32",
                                  "shape": [1], "stride": [1], "offset": 7}])
        time.sleep(0.6)  # past the value's time to live: the next look at the store drops it
        late = user.send(reads, {"input_ids": tokens},
                         refs=[{"tid": "c0", "resident": cid, "dtype": "float32",
                                "shape": [1], "stride": [1], "offset": 7}])
        refused = user.collect([late])[late]
        assert refused.error is not None and refused.error.code == "resident_missing"
        assert len(store) == 0
        assert store.bytes == value.numel() * 4, \
            "a value the queued request holds is no longer counted"
        release.set()
        answers = user.collect([queued])
        assert other.collect([held])[held].error is None
        assert answers[queued].error is None, answers[queued].error
        torch.testing.assert_close(answers[queued].values["x"], value[7:8] * 2.0)
        deadline = time.monotonic() + 10
        while store.bytes and time.monotonic() < deadline:
            time.sleep(0.01)  # (the worker lets the request's objects go as it ends)
        assert store.bytes == 0 and srv.server.residents.total_bytes == 0
    finally:
        release.set()
        if handle is not None:
            handle.remove()
        user.close()
        other.close()
        srv.stop()


def test_a_result_kept_after_its_keyless_connection_closed_does_not_count_forever(hosted):
    """Without API keys every connection is a user, and its store is dropped when it closes
    (``Residents.drop_user``). A request of that connection still running then keeps its
    next saved value (``_send_tensor`` -> ``store.put``: no ``closed`` check between the
    node's own check and the put) in the dropped store: the value's bytes are added to the
    server-wide ``total_bytes`` and never taken off (nobody reaches that store again, and
    ``evict_over_total`` only looks at live stores). Each such disconnect fills the server-
    wide resident budget for good; once full, every other user's kept value is evicted the
    moment it is stored, and their next call by reference fails (found by a review,
    seventeenth session)."""
    import time

    from graphs import const, graph, node, read_graph, ref
    from pipelined import PipelinedClient
    from hookwire.protocol import Result

    side = 2048  # a product that takes a while: the connection closes while it runs
    leaked = side * side * 4
    srv = hs.start(models={"tiny-gpt2": hosted["tiny-gpt2"].bridge}, port=0,
                   limits=Limits(max_node_seconds=120.0, max_resident_bytes_total=leaked))
    server = srv.server
    try:
        tokens = torch.arange(1, 9, dtype=torch.int64)[None]
        attacker = PipelinedClient(srv.url)
        # n1 (1 MiB: handed to the loop at once) tells the client that n2 is about to run.
        g = graph("tiny-gpt2", [node(0, "expand", const("s"), side, side),
                                node(1, "expand", const("t"), 512, 512),
                                node(2, "matmul", ref(0), ref(0))],
                  saves={"signal": 1, "y": 2}, constants=["s", "t"], return_type=None)
        attacker.send(g, {"input_ids": tokens, "s": torch.randn(side, 1),
                          "t": torch.randn(512, 1)}, keep_results=True)
        while True:  # the product has begun (its node's check passed)
            data = attacker.ws.recv(timeout=60)
            if isinstance(data, str) and isinstance(parse_server_message(data), Result) \
                    and parse_server_message(data).name == "signal":
                break
        attacker.close()  # ... and the connection ends while it runs
        deadline = time.monotonic() + 120
        while (server.states or server.worker.current or server.worker.queue_depth()) \
                and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.2)
        assert not server.states and not server.worker.current
        held = server.residents.total_bytes
        # Nobody is connected and nothing runs: no resident value is held by anyone.
        assert held == 0, f"{held} bytes of resident values counted for a connection " \
                          "that is gone"
        # What that does to another user: its kept result is evicted as it is stored.
        victim = PipelinedClient(srv.url)
        try:
            victim.ws.send(json.dumps({"type": "submit", "request_id": "keep",
                                       "keep_results": True, "progress": False,
                                       "graph": read_graph("tiny-gpt2",
                                                           ["blocks.0.hook_resid_pre"],
                                                           names=["r"], return_type=None),
                                       "tensors": [header_for("input_ids", tokens)
                                                   .model_dump()]}))
            for frame in encode_chunks("keep", "input_ids", tokens):
                victim.ws.send(frame)
            resident = None
            while True:
                data = victim.ws.recv(timeout=60)
                if isinstance(data, bytes):
                    continue
                msg = parse_server_message(data)
                if isinstance(msg, Result):
                    resident, header = msg.resident, msg.tensor
                if msg.type in ("done", "error"):
                    assert msg.type == "done", msg
                    break
            assert resident is not None
            victim.ws.send(json.dumps({
                "type": "submit", "request_id": "again", "keep_results": False,
                "tensors": [header_for("input_ids", tokens).model_dump()],
                "graph": graph("tiny-gpt2", [node(0, "mul", const("r"), 1.0)],
                               saves={"r2": 0}, constants=["r"], return_type=None),
                "refs": [{"tid": "r", "resident": resident, "dtype": header.dtype,
                          "shape": header.shape, "stride": [header.shape[1] * header.shape[2],
                                                            header.shape[2], 1],
                          "offset": 0}]}))
            for frame in encode_chunks("again", "input_ids", tokens):
                victim.ws.send(frame)
            again = victim.collect(["again"])["again"]
            assert again.error is None, again.error
        finally:
            victim.close()
    finally:
        srv.stop()
