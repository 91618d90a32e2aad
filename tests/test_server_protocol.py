"""The server, spoken to directly through ``hookwire.client.Connection``.

Bad graphs are refused with typed errors before anything runs, and after EACH bad request the
very same connection still serves a good request with the right answer (checked against a
local TL run). Plus: /health over plain HTTP, typed errors for raw protocol abuse, limits from
``hookwire.validate.Limits``, and a clean stop (no thread or process left behind).
"""
from __future__ import annotations

import json
import multiprocessing
import threading
import time
import urllib.request
import uuid

import graphs
import pytest
import torch
from torch.testing import assert_close

import hookwire.server as hs
from hookwire.client import Connection
from hookwire.errors import (ExecutionError, GraphValidationError, HookwireError,
                             LimitExceeded, ProtocolError, ServerUnavailable, UnknownModel)
from hookwire.frames import encode_chunks
from hookwire.protocol import Done, Error, parse_server_message
from hookwire.validate import Limits

from conftest import MODEL_NAMES
from known_good import assert_good, good_graph

SITE = "blocks.1.hook_resid_pre"
SITE_CANONICAL = "blocks.1.hook_in"
FULL = graphs.FULL


# ---- graph builders ----------------------------------------------------------------------------

def graph(model="tiny-gpt2", nodes=(), sites=(SITE,), saves=None, constants=(),
          return_type="logits", **extra):
    return graphs.graph(model, nodes, [(s, 0) for s in sites], saves, constants, return_type,
                        **{"version": 1, **extra})


def read_node():
    return {"id": 0, "op": "site.read", "args": [0]}


# ---- fixtures ----------------------------------------------------------------------------------

def send_raw(conn, *messages):
    for m in messages:
        conn.ws.send(m)


def recv_final(conn, timeout=30):
    """Read server messages until an error or done; return that message."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        data = conn.ws.recv(timeout=max(0.1, deadline - time.monotonic()))
        if isinstance(data, bytes):
            continue
        msg = parse_server_message(data)
        if isinstance(msg, (Error, Done)):
            return msg
    raise AssertionError("server sent neither error nor done")


# ---- the good request works, for both models ---------------------------------------------------

@pytest.mark.parametrize("model", MODEL_NAMES)
def test_good_request_matches_local(conn, good_answers, tokens, model):
    assert_good(conn, good_answers, tokens, model)
    info = conn.model_info(model)
    # Sites are published under canonical names; the graph above used TL's alias for one.
    assert any(s.name == SITE_CANONICAL for s in info.sites)


def test_model_info_names_sites_and_config(conn):
    info = conn.model_info("tiny-llama")
    assert info.architecture == "LlamaForCausalLM"
    assert info.config["num_key_value_heads"] == 2
    assert info.tokenizer_files
    names = [s.name for s in info.sites]
    assert len(names) == len(set((s.name, s.call) for s in info.sites))
    assert names.index("blocks.0.hook_in") < names.index("blocks.1.hook_in")
    assert "blocks.0.hook_resid_pre" not in names  # aliases are not listed twice


# ---- bad graphs: typed errors, and the connection keeps serving --------------------------------

UNKNOWN_OPS = ["__import__", "eval", "exec", "os.system", "getattr", "torch.load",
               "builtins.open", "subprocess.Popen", "__class__", "", "Tensor.__reduce_ex__"]


@pytest.mark.parametrize("op", UNKNOWN_OPS)
def test_unknown_op_refused(conn, good_answers, tokens, op):
    bad = graph(nodes=[read_node(), {"id": 1, "op": op, "args": [{"ref": 0}]}],
                saves={"x": 1})
    with pytest.raises(GraphValidationError) as info:
        conn.run(bad, {"input_ids": tokens})
    assert info.value.details.get("rule") == "unknown_op"
    assert_good(conn, good_answers, tokens)


def _bad_graphs():
    n0 = read_node()
    return {
        "dangling_ref": (graph(nodes=[n0, {"id": 1, "op": "add", "args": [{"ref": 0},
                                                                             {"ref": 99}]}],
                               saves={"x": 1}), GraphValidationError),
        "forward_ref": (graph(nodes=[n0, {"id": 1, "op": "add", "args": [{"ref": 0},
                                                                            {"ref": 2}]},
                                     {"id": 2, "op": "neg", "args": [{"ref": 0}]}],
                              saves={"x": 1}), GraphValidationError),
        "cycle": (graph(nodes=[n0, {"id": 1, "op": "neg", "args": [{"ref": 2}]},
                               {"id": 2, "op": "neg", "args": [{"ref": 1}]}],
                        saves={"x": 2}), GraphValidationError),
        "self_ref": (graph(nodes=[n0, {"id": 1, "op": "add", "args": [{"ref": 0},
                                                                         {"ref": 1}]}],
                           saves={"x": 1}), GraphValidationError),
        "duplicate_id": (graph(nodes=[n0, {"id": 0, "op": "neg", "args": [{"ref": 0}]}]),
                         GraphValidationError),
        "save_unknown_node": (graph(nodes=[n0], saves={"x": 7}), GraphValidationError),
        "wrong_shape_write": (graph(nodes=[n0, {"id": 1, "op": "sum", "args": [{"ref": 0}],
                                                "kwargs": {"dim": -1}},
                                           {"id": 2, "op": "site.write",
                                            "args": [0, {"ref": 1}],
                                            "kwargs": {"mode": "replace"}}]),
                              GraphValidationError),
        "wrong_dtype_write": (graph(nodes=[n0, {"id": 1, "op": "to",
                                                "args": [{"ref": 0}, {"dtype": "float64"}]},
                                           {"id": 2, "op": "site.write",
                                            "args": [0, {"ref": 1}],
                                            "kwargs": {"mode": "replace"}}]),
                              GraphValidationError),
        "bad_write_mode": (graph(nodes=[n0, {"id": 1, "op": "site.write",
                                             "args": [0, {"ref": 0}],
                                             "kwargs": {"mode": "append"}}]),
                           GraphValidationError),
        "unknown_site": (graph(sites=["blocks.99.hook_resid_pre"], nodes=[n0],
                               saves={"x": 0}), GraphValidationError),
        "site_not_a_hook": (graph(sites=["blocks.0.attn"], nodes=[n0], saves={"x": 0}),
                            GraphValidationError),
        "sites_out_of_order": (graph(sites=["blocks.1.hook_resid_pre",
                                            "blocks.0.hook_resid_pre"],
                                     nodes=[n0, {"id": 1, "op": "site.read", "args": [1]}],
                                     saves={"x": 1}), GraphValidationError),
        "site_index_out_of_range": (graph(nodes=[{"id": 0, "op": "site.read", "args": [5]}]),
                                    GraphValidationError),
        "write_depends_on_later_site": (
            graph(sites=["blocks.0.hook_resid_pre", "blocks.1.hook_resid_pre"],
                  nodes=[n0, {"id": 1, "op": "site.read", "args": [1]},
                         {"id": 2, "op": "site.write", "args": [0, {"ref": 1}],
                          "kwargs": {"mode": "replace"}}]), GraphValidationError),
        "bad_arg_dtype": (graph(nodes=[n0, {"id": 1, "op": "to",
                                            "args": [{"ref": 0}, {"dtype": "complex64"}]}],
                                saves={"x": 1}), GraphValidationError),
        "bad_arg_object": (graph(nodes=[n0, {"id": 1, "op": "add",
                                             "args": [{"ref": 0}, {"__class__": "os"}]}],
                                 saves={"x": 1}), GraphValidationError),
        "bad_arg_kind": (graph(nodes=[n0, {"id": 1, "op": "softmax",
                                           "args": [{"ref": 0}, "minus one"]}],
                               saves={"x": 1}), GraphValidationError),
        "unknown_kwarg": (graph(nodes=[n0, {"id": 1, "op": "sum", "args": [{"ref": 0}],
                                            "kwargs": {"out": {"ref": 0}}}],
                                saves={"x": 1}), GraphValidationError),
        "einsum_injection": (graph(nodes=[n0, {"id": 1, "op": "einsum",
                                               "args": ["__import__('os')", {"ref": 0}]}],
                                   saves={"x": 1}), GraphValidationError),
        "undeclared_const": (graph(nodes=[n0, {"id": 1, "op": "add",
                                               "args": [{"ref": 0}, {"const": "nope"}]}],
                                   saves={"x": 1}), GraphValidationError),
        "shape_mismatch": (graph(nodes=[n0, {"id": 1, "op": "matmul",
                                             "args": [{"ref": 0}, {"ref": 0}]}],
                                 saves={"x": 1}), GraphValidationError),
        "memory_bomb_expand": (graph(nodes=[n0, {"id": 1, "op": "expand",
                                                 "args": [{"ref": 0}, [10**6, 10**6, 2, 12, 64]]},
                                            {"id": 2, "op": "contiguous", "args": [{"ref": 1}]}],
                                     saves={"x": 2}), GraphValidationError),
        "memory_bomb_repeat": (graph(nodes=[n0, {"id": 1, "op": "repeat",
                                                 "args": [{"ref": 0}, [100000, 100000, 1]]}],
                                     saves={"x": 1}), GraphValidationError),
        "memory_bomb_outer": (graph(nodes=[n0, {"id": 1, "op": "reshape",
                                                "args": [{"ref": 0}, [-1]]},
                                           {"id": 2, "op": "outer",
                                            "args": [{"ref": 1}, {"ref": 1}]},
                                           {"id": 3, "op": "outer",
                                            "args": [{"ref": 2}, {"ref": 2}]}],
                                    saves={"x": 3}), GraphValidationError),
        "unknown_model": (graph(model="gpt-5", nodes=[n0], saves={"x": 0}), UnknownModel),
        "extra_field": (graph(nodes=[n0], saves={"x": 0}, pickle="gASVAAAA"), HookwireError),
        "wrong_version": (dict(graph(nodes=[n0], saves={"x": 0}), version=99), HookwireError),
        "deep_args": (graph(nodes=[n0, {"id": 1, "op": "add",
                                        "args": [{"ref": 0}, [[[[[[[[[[1]]]]]]]]]]]}],
                            saves={"x": 1}), GraphValidationError),
    }


BAD_CASES = list(_bad_graphs())


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_graph_refused_then_connection_serves(conn, good_answers, tokens, case):
    bad, error_type = _bad_graphs()[case]
    with pytest.raises(error_type):
        conn.run(bad, {"input_ids": tokens})
    assert_good(conn, good_answers, tokens)
    assert_good(conn, good_answers, tokens, "tiny-llama")


def test_memory_bomb_is_refused_as_a_limit(conn, good_answers, tokens):
    bad, _ = _bad_graphs()["memory_bomb_expand"]
    with pytest.raises(LimitExceeded):
        conn.run(bad, {"input_ids": tokens})
    assert_good(conn, good_answers, tokens)


def test_one_connection_survives_every_bad_request_in_a_row(conn, good_answers, tokens):
    for case, (bad, error_type) in _bad_graphs().items():
        with pytest.raises(error_type):
            conn.run(bad, {"input_ids": tokens})
        assert_good(conn, good_answers, tokens)


@pytest.mark.parametrize("bad_tokens", ["float", "out_of_vocab", "negative", "1d"])
def test_bad_input_ids_refused(conn, good_answers, tokens, bad_tokens):
    t = {"float": tokens.float(), "out_of_vocab": tokens + 10_000, "negative": tokens - 1000,
         "1d": tokens[0]}[bad_tokens]
    with pytest.raises(ProtocolError):
        conn.run(good_graph("tiny-gpt2"), {"input_ids": t})
    assert_good(conn, good_answers, tokens)


def test_execution_error_mid_forward_then_connection_serves(conn, good_answers, tokens):
    """Passes validation, fails while the model runs: typed error, model left clean."""
    bad = graph(nodes=[read_node(), {"id": 1, "op": "index_select",
                                     "args": [{"ref": 0}, 1, {"const": "c0"}]}],
                saves={"x": 1}, constants=["c0"])
    with pytest.raises(ExecutionError):
        conn.run(bad, {"input_ids": tokens, "c0": torch.tensor([100])})
    assert_good(conn, good_answers, tokens)


def test_too_many_nodes_refused_by_limits(tokens, local_models, hosted):
    srv = hs.start(models={"tiny-gpt2": hosted["tiny-gpt2"].bridge}, port=0,
                   limits=Limits(max_nodes=50))
    try:
        c = Connection(srv.url)
        try:
            nodes = [read_node()] + [{"id": i, "op": "neg", "args": [{"ref": i - 1}]}
                                     for i in range(1, 60)]
            with pytest.raises(LimitExceeded) as info:
                c.run(graph(nodes=nodes, saves={"x": 59}), {"input_ids": tokens})
            assert info.value.details.get("rule") == "max_nodes"
            # 49 nodes is fine on the same connection, and right.
            ok = c.run(graph(nodes=nodes[:49], saves={"x": 48}), {"input_ids": tokens})
            seen = {}

            def hook(act, hook):
                seen["x"] = act.detach().clone()

            local_models["tiny-gpt2"].run_with_hooks(tokens, fwd_hooks=[(SITE, hook)])
            assert_close(ok.values["x"], seen["x"])  # an even number of negations
        finally:
            c.close()
    finally:
        srv.stop()


# ---- raw protocol abuse ------------------------------------------------------------------------

def _submit_text(rid, g, headers):
    return json.dumps({"type": "submit", "request_id": rid, "graph": g, "tensors": headers})


@pytest.mark.parametrize("dtype", ["complex64", "object", "torch.float32", "float128", ""])
def test_bad_dtype_in_tensor_header(conn, good_answers, tokens, dtype):
    rid = f"raw-{uuid.uuid4().hex[:8]}"
    send_raw(conn, _submit_text(rid, good_graph("tiny-gpt2"),
                                [{"tid": "input_ids", "dtype": dtype, "shape": [2, 12]}]))
    msg = recv_final(conn)
    assert isinstance(msg, Error) and msg.code in ("frame_error", "protocol_error")
    assert_good(conn, good_answers, tokens)


def test_bad_dtype_header_followed_by_its_frames(conn, good_answers, tokens):
    """A client sends a submit's frames right after it (Connection.run does): a refused
    submit must not leave its frames to poison the next request on the connection."""
    rid = f"raw-{uuid.uuid4().hex[:8]}"
    send_raw(conn, _submit_text(rid, good_graph("tiny-gpt2"),
                                [{"tid": "input_ids", "dtype": "complex64",
                                  "shape": list(tokens.shape)}]),
             *encode_chunks(rid, "input_ids", tokens))
    msg = recv_final(conn)
    assert isinstance(msg, Error) and msg.code == "frame_error"
    assert_good(conn, good_answers, tokens)
    assert_good(conn, good_answers, tokens)


def test_lying_frame_offset(conn, good_answers, tokens):
    rid = f"raw-{uuid.uuid4().hex[:8]}"
    send_raw(conn, _submit_text(rid, good_graph("tiny-gpt2"),
                                [{"tid": "input_ids", "dtype": "int64",
                                  "shape": list(tokens.shape)}]))
    head = json.dumps({"v": 1, "rid": rid, "tid": "input_ids", "offset": 10**9}).encode()
    frame = len(head).to_bytes(4, "little") + head + bytes(8)
    send_raw(conn, frame)
    msg = recv_final(conn)
    assert isinstance(msg, Error) and msg.code == "frame_error"
    assert_good(conn, good_answers, tokens)


@pytest.mark.parametrize("message", [
    "not json at all",
    json.dumps({"type": "submit"}),
    json.dumps({"type": "launch_missiles"}),
    json.dumps([1, 2, 3]),
    b"\x01\x00",
    b"\xff\xff\xff\x7f" + b"{}",
])
def test_malformed_messages_get_typed_errors(conn, good_answers, tokens, message):
    send_raw(conn, message)
    msg = recv_final(conn)
    assert isinstance(msg, Error) and msg.code in ("protocol_error", "frame_error")
    assert_good(conn, good_answers, tokens)


def test_unknown_model_info(conn, good_answers, tokens):
    with pytest.raises(UnknownModel):
        conn.model_info("no-such-model")
    assert_good(conn, good_answers, tokens)


def test_wrong_protocol_version_hello(conn, good_answers, tokens):
    send_raw(conn, json.dumps({"type": "hello", "protocol": 999, "client_version": "x"}))
    msg = recv_final(conn)
    assert isinstance(msg, Error) and msg.code == "protocol_error"
    assert "protocol" in msg.message
    assert_good(conn, good_answers, tokens)


# ---- HTTP health ---------------------------------------------------------------------------

def test_health_over_plain_http(server):
    port = int(server.url.rsplit(":", 1)[1])
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=10) as resp:
        assert resp.status == 200
        assert resp.headers.get("Content-Type", "").startswith("application/json")
        body = json.loads(resp.read())
    assert body["status"] == "ok"
    assert sorted(body["models"]) == sorted(MODEL_NAMES)
    assert isinstance(body["protocol"], int) and "version" in body


# ---- lifecycle: stop leaves nothing behind -------------------------------------------------

def _threads():
    return {(t.name, t.ident) for t in threading.enumerate()}


def test_start_stop_leaves_no_threads_or_processes(hosted, tokens):
    import psutil

    before = _threads()
    children_before = {p.pid for p in psutil.Process().children(recursive=True)}
    srv = hs.start(models={"tiny-gpt2": hosted["tiny-gpt2"].bridge}, port=0)
    try:
        url = srv.url
        during = _threads()
        assert during - before, "the server runs in background threads"
        c = Connection(url)
        try:
            res = c.run(good_graph("tiny-gpt2"), {"input_ids": tokens})
            assert "__logits__" in res.values
        finally:
            c.close()
    finally:
        srv.stop()
    deadline = time.monotonic() + 10
    while _threads() - before and time.monotonic() < deadline:
        time.sleep(0.05)
    leftover = _threads() - before
    assert not leftover, f"threads left behind: {sorted(n for n, _ in leftover)}"
    assert multiprocessing.active_children() == []
    assert {p.pid for p in psutil.Process().children(recursive=True)} == children_before
    with pytest.raises((ServerUnavailable, OSError)):
        Connection(url, open_timeout=3)


def test_stop_with_a_connection_still_open(hosted, tokens):
    before = _threads()
    srv = hs.start(models={"tiny-gpt2": hosted["tiny-gpt2"].bridge}, port=0)
    c = Connection(srv.url)
    try:
        c.model_info("tiny-gpt2")
        t0 = time.monotonic()
        srv.stop()
        assert time.monotonic() - t0 < 15, "stop() hangs on an open client connection"
    finally:
        c.close()
    deadline = time.monotonic() + 10
    while _threads() - before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not (_threads() - before)


def test_client_connection_uses_no_deprecated_websockets_api(server):
    """websockets 17 deprecates calling sync connect() outside a context manager without
    legacy=True; the client must not depend on an API slated for removal."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        c = Connection(server.url)
        try:
            assert c.model_info("tiny-gpt2").name == "tiny-gpt2"
        finally:
            c.close()


def test_a_user_flooding_messages_is_held_to_its_share_of_the_front(hosted, tokens):
    """Every message a user sends costs the event loop (receiving it, refusing it, sending
    the refusal); each user may spend ``front_share`` seconds of it per second
    (server/intake.FrontShare) while another user is active. Alone on the server, a
    connection flooding malformed submits never waits; beside a user running requests, its
    reads wait for its share -- each refusal still answered -- while the other user never
    waits and each of its answers equals local TL."""
    share = 0.02  # twenty milliseconds of the loop per second, a burst of as much
    srv = hs.start(models={"tiny-gpt2": hosted["tiny-gpt2"].bridge}, port=0,
                   limits=Limits(front_share=share))
    fs = srv.server.share
    n, size = 10, 1 << 20
    junk = json.dumps({"type": "submit", "request_id": "r"}) + " " * size
    # At least what receiving them is charged (besides what was timed): ten messages of a
    # MiB cost more than the burst.
    floor = (n * (fs.MESSAGE_S + len(junk) / fs.BYTES_PER_S[str]) - share) / share

    def flood(conn) -> float:
        started = time.monotonic()
        send_raw(conn, *[junk] * n)
        answers = [parse_server_message(conn.ws.recv(timeout=60)) for _ in range(n)]
        assert all(isinstance(a, Error) and a.code == ProtocolError.code for a in answers)
        return time.monotonic() - started

    flooder = Connection(srv.url)
    other = None
    stop, answers, errors = threading.Event(), [], []
    want = hosted["tiny-gpt2"].bridge(tokens)

    def keep_busy():
        try:
            while not stop.is_set():  # a request every 0.2 s: well within its share
                answers.append(other.run(graph(nodes=[], sites=()), {"input_ids": tokens})
                               .values["__logits__"])
                stop.wait(0.2)
        except Exception as exc:  # (reported below)
            errors.append(exc)

    busy = threading.Thread(target=keep_busy)
    try:
        flood(flooder)
        assert fs.waited_s == {}  # alone: nobody to make room for
        other = Connection(srv.url)
        busy.start()
        elapsed = flood(flooder)
        stop.set()
        busy.join(60)
        assert not errors and answers
        (waited,) = fs.waited_s.values()  # the flooder's reads waited, the other's never
        assert waited >= floor > 1.0, (waited, floor)
        assert elapsed > 1.0  # really slowed (the flood alone took a fraction of that)
        for got in answers:
            assert_close(got, want)
        assert_close(flooder.run(graph(nodes=[], sites=()), {"input_ids": tokens})
                     .values["__logits__"], want)
    finally:
        stop.set()
        flooder.close()
        if other is not None:
            other.close()
        srv.stop()


def test_answers_are_charged_to_the_share_of_the_user_they_go_to():
    """A small answer costs the loop thread's CPU time its send took; a large one, which may
    have waited for its socket while others ran, is charged by its size (FrontShare)."""
    from hookwire.server.intake import FrontShare
    fs = FrontShare(0.25)
    fs.charge_sent("a", 0.1, b"x" * 100)
    assert fs._now_credit("a") == pytest.approx(0.15, abs=1e-3)
    big = b"x" * (FrontShare.MEASURED_SEND_BYTES + 1)
    fs.charge_sent("b", 5.0, big)  # five seconds of loop time measured while it waited
    assert fs._now_credit("b") == pytest.approx(0.25 - len(big) / FrontShare.BYTES_PER_S[bytes],
                                                 abs=1e-3)
    fs.charge("c", 0.0, "")
    assert fs._now_credit("c") == pytest.approx(0.25 - FrontShare.MESSAGE_S, abs=1e-5)
