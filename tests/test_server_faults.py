"""Faults against a real server: a client vanishing mid-stream, oversized messages, a request
whose saves exceed the limit, hashed API keys, a server restarted under a client -- and
the others keep being served correctly throughout."""
from __future__ import annotations

import hashlib
import json
import socket
import threading
import time
import uuid

import pytest
import torch
from websockets.exceptions import ConnectionClosed

import hookwire
import hookwire.server as hs
from hookwire.client import Connection, close_connections
from hookwire.errors import AuthError, LimitExceeded, ServerUnavailable
from hookwire.frames import encode_chunks, header_for
from hookwire.validate import Limits

SITE = "blocks.0.hook_resid_post"


def read_graph(model="tiny-gpt2", return_type="logits"):
    return {"model": model, "inputs": {"input_ids": "input_ids"}, "sites": [{"name": SITE}],
            "nodes": [{"id": 0, "op": "site.read", "args": [0]}], "saves": {"resid": 0},
            "forward": {"return_type": return_type}}


def local_resid(bridge, tokens):
    seen = {}
    with torch.no_grad():
        logits = bridge.run_with_hooks(tokens, fwd_hooks=[
            (SITE, lambda act, hook: seen.__setitem__("r", act.clone()))])
    return logits, seen["r"]


@pytest.fixture
def own_server(hosted):
    """A fresh server per test (these tests break connections on purpose)."""
    handles = []

    def make(**kw):
        srv = hs.start(models={"tiny-gpt2": hosted["tiny-gpt2"].bridge}, port=0, **kw)
        handles.append(srv)
        return srv
    yield make
    close_connections()
    for srv in handles:
        srv.stop()


def test_client_vanishing_mid_stream_frees_its_resources(own_server, local_models):
    srv = own_server()
    bridge = local_models["tiny-gpt2"]
    big = bridge.to_tokens(["x" * 200] * 8)
    tokens = bridge.to_tokens(["hello world"])
    # Computed before the leaver's forward starts on this very object (the embedded server
    # hosts it): see test_cancel's tests of a local forward beside a served one.
    expected_logits, expected_resid = local_resid(bridge, tokens)
    leaver = Connection(srv.url)
    rid = "leaving-" + uuid.uuid4().hex[:6]
    leaver.ws.send(json.dumps({"type": "submit", "request_id": rid, "graph": read_graph(),
                               "tensors": [header_for("input_ids", big).model_dump()]}))
    for frame in encode_chunks(rid, "input_ids", big):
        leaver.ws.send(frame)
    leaver.ws.recv(timeout=30)           # accepted: it is queued or running
    leaver.ws.close()                    # and gone, with its results still streaming
    stayer = Connection(srv.url)
    try:
        for _ in range(3):
            result = stayer.run(read_graph(), {"input_ids": tokens})
            torch.testing.assert_close(result.values["__logits__"], expected_logits)
            torch.testing.assert_close(result.values["resid"], expected_resid)
        deadline = time.monotonic() + 10
        while len(srv.server.states) > 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        # Only the stayer is left: the leaver's connection state, quota and store are gone.
        assert len(srv.server.states) == 1
        assert sum(srv.server.connections_per_user.values()) == 1
        assert srv.server.worker.queue_depth() == 0
    finally:
        stayer.close()


def test_oversized_message_closes_with_1009_and_others_go_on(own_server, local_models):
    srv = own_server(limits=Limits(max_message_bytes=1 << 16))
    tokens = local_models["tiny-gpt2"].to_tokens(["hello world"])
    other = Connection(srv.url)
    greedy = Connection(srv.url)
    try:
        greedy.ws.send("x" * (1 << 17))
        with pytest.raises(ConnectionClosed) as info:
            greedy.ws.recv(timeout=30)
        assert info.value.rcvd is not None and info.value.rcvd.code == 1009
        expected_logits, _ = local_resid(local_models["tiny-gpt2"], tokens)
        result = other.run(read_graph(), {"input_ids": tokens})
        torch.testing.assert_close(result.values["__logits__"], expected_logits)
    finally:
        other.close()


def test_saves_over_the_limit_are_refused_and_the_connection_serves(own_server, local_models):
    srv = own_server(limits=Limits(max_saved_bytes=1000))
    bridge = local_models["tiny-gpt2"]
    tokens = bridge.to_tokens(["hello world"])
    with pytest.raises(LimitExceeded) as info:
        bridge.run_with_cache(tokens, remote=srv.url)
    assert info.value.details.get("rule") == "max_saved_bytes"
    logits = bridge.run_with_hooks(tokens, remote=srv.url)  # nothing saved: fine
    with torch.no_grad():
        torch.testing.assert_close(logits, bridge(tokens))


def test_hashed_api_key_entries(own_server, local_models):
    secret = "s3cret-key"
    srv = own_server(api_keys=["sha256:" + hashlib.sha256(secret.encode()).hexdigest()])
    with pytest.raises(AuthError):
        Connection(srv.url, "sha256:" + hashlib.sha256(secret.encode()).hexdigest())
    with pytest.raises(AuthError):
        Connection(srv.url, "wrong")
    conn = Connection(srv.url, secret)
    try:
        tokens = local_models["tiny-gpt2"].to_tokens(["hi"])
        assert "__logits__" in conn.run(read_graph(), {"input_ids": tokens}).values
    finally:
        conn.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_server_restart_clear_error_then_the_same_call_works(hosted, local_models):
    bridge = local_models["tiny-gpt2"]
    tokens = bridge.to_tokens(["hello world"])
    port = _free_port()
    url = f"ws://127.0.0.1:{port}"
    with torch.no_grad():
        expected = bridge(tokens)
    srv = hs.start(models={"tiny-gpt2": hosted["tiny-gpt2"].bridge}, port=port)
    try:
        torch.testing.assert_close(bridge.run_with_hooks(tokens, remote=url), expected)
    finally:
        srv.stop()
    try:
        with pytest.raises(ServerUnavailable):
            bridge.run_with_hooks(tokens, remote=url)
        srv = hs.start(models={"tiny-gpt2": hosted["tiny-gpt2"].bridge}, port=port)
        try:
            torch.testing.assert_close(bridge.run_with_hooks(tokens, remote=url), expected)
        finally:
            srv.stop()
    finally:
        close_connections()
        hookwire.client._connections.clear()


def test_every_accepted_request_ends_exactly_once_under_concurrency(own_server, local_models):
    """Many requests from several connections, some bad: each gets exactly one done or
    error, the good ones equal their solo answers."""
    srv = own_server(batch_window_s=0.02)
    bridge = local_models["tiny-gpt2"]
    tokens = bridge.to_tokens(["hello world", "again text!"])
    expected_logits, expected_resid = local_resid(bridge, tokens)
    bad = dict(read_graph(), nodes=[{"id": 0, "op": "no_such_op", "args": []}], saves={})
    problems = []

    def client(k):
        conn = Connection(srv.url)
        try:
            for i in range(6):
                if (k + i) % 3 == 0:
                    try:
                        conn.run(bad, {"input_ids": tokens})
                        problems.append("a bad graph ran")
                    except Exception as exc:
                        if type(exc).__name__ != "GraphValidationError":
                            problems.append(repr(exc))
                    continue
                r = conn.run(read_graph(), {"input_ids": tokens})
                if not (torch.allclose(r.values["__logits__"], expected_logits, atol=1e-5)
                        and torch.allclose(r.values["resid"], expected_resid, atol=1e-5)):
                    problems.append("mismatch")
        except Exception as exc:
            problems.append(repr(exc))
        finally:
            conn.close()
    threads = [threading.Thread(target=client, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert problems == []
