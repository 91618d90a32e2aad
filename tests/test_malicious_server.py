"""The client never trusts a server: a hostile websocket server (real sockets, 127.0.0.1)
answers a submit with lies -- bytes for tensors it never announced, offsets past a buffer,
frames of another request, pickle bytes, results larger than the client accepts, an
oversized message -- and the client raises a typed error every time, unpickles nothing, and
hands the user no tensor."""
from __future__ import annotations

import base64
import json
import threading

import pytest
import torch
from websockets.sync.server import serve

from hookwire.client import MAX_RESULT_BYTES, Connection
from hookwire.errors import FrameError, HookwireError, ProtocolError, ServerUnavailable
from hookwire.protocol import MAX_CONTROL_BYTES
from hookwire.ws_connection import DIRECT_READ_BYTES
from hostile.runner import CORPUS_PATH, PAYLOAD_MARKER

PICKLE = base64.b64decode(next(c for c in json.loads(CORPUS_PATH.read_text())["cases"]
                               if c["name"].startswith("pickle payload as a whole"))["raw"][0]
                          ["binary_b64"])
# The request asks for one value, "x" (what the site reads), and no logits.
GRAPH = {"version": 1, "model": "m", "inputs": {"input_ids": "input_ids"},
         "sites": [{"name": "s"}], "nodes": [{"id": 0, "op": "site.read", "args": [0]}],
         "saves": {"x": 0}, "forward": {"return_type": None}}
# What the lying server says about model "m" (for the client to size what it asked for).
MODEL_INFO = {"type": "model_info", "model": "m", "architecture": "GPT2LMHeadModel",
              "config": {"vocab_size": 8}, "tokenizer_files": {},
              "sites": [{"name": "s", "shape": ["B", "S", 4], "dtype": "float32"}]}


def result(rid, shape=(2, 3), tid="t1", dtype="float32"):
    return json.dumps({"type": "result", "request_id": rid, "name": "x",
                       "tensor": {"tid": tid, "dtype": dtype, "shape": list(shape)}})


def frame(rid, tid, offset, payload: bytes):
    head = json.dumps({"v": 1, "rid": rid, "tid": tid, "offset": offset}).encode()
    return len(head).to_bytes(4, "little") + head + payload


LIES = {
    "bytes for an unannounced tensor": (lambda rid: [frame(rid, "t9", 0, bytes(24))],
                                        ProtocolError),
    "offset past the buffer": (lambda rid: [result(rid), frame(rid, "t1", 16, bytes(24))],
                               FrameError),
    "frames of another request": (lambda rid: [result(rid), frame("other", "t1", 0, bytes(24))],
                                  ProtocolError),
    "a pickle as a binary message": (lambda rid: [PICKLE], FrameError),
    "a pickle as a result's bytes": (lambda rid: [result(rid, (len(PICKLE),), dtype="uint8"),
                                                  frame(rid, "t1", 0, PICKLE), "NOT-JSON"],
                                     ProtocolError),
    "an answer to another request": (lambda rid: [json.dumps(
        {"type": "done", "request_id": "someone-else"})], ProtocolError),
    "results over the client's limit": (lambda rid: [
        result(rid, (MAX_RESULT_BYTES // 8,), "t1"), result(rid, (MAX_RESULT_BYTES // 8,), "t2"),
        result(rid, (MAX_RESULT_BYTES // 8,), "t3")], ProtocolError),
    "a dtype outside the allow-list": (lambda rid: [result(rid, dtype="object")], ProtocolError),
    "a shape torch cannot represent": (lambda rid: [result(rid, (0, 2 ** 70))], FrameError),
    "done before every result": (lambda rid: [result(rid), json.dumps(
        {"type": "done", "request_id": rid})], ProtocolError),
    "a message larger than the client accepts": (lambda rid: [b"\0" * (MAX_CONTROL_BYTES + 1)],
                                                 ServerUnavailable),
    "not JSON": (lambda rid: ["{'type': 'done'}"], ProtocolError),
    # It asked for "x" only: a 1 GiB value under another name (e.g. the logits of a request
    # that wants none back) is refused before anything is buffered...
    "a result the request never asked for": (lambda rid: [result(rid, (1 << 28,), "t1")
                                                          .replace('"x"', '"__logits__"')],
                                             ProtocolError),
    # ...and so is "x" twice, or "x" larger than the site it reads (1 x 2 x 4 float32).
    "the same result twice": (lambda rid: [result(rid, (1, 2, 4), "t1"), frame(
        rid, "t1", 0, bytes(32)), result(rid, (1, 2, 4), "t2")], ProtocolError),
    "a result larger than the request can make": (lambda rid: [result(rid, (1, 2, 1 << 20))],
                                                  ProtocolError),
    # Large frames, which the client's websocket reads straight from the socket
    # (ws_connection.DIRECT_READ_BYTES), meet the same checks as small ones.
    "a large frame for an unannounced tensor": (lambda rid: [
        frame(rid, "t9", 0, bytes(2 * DIRECT_READ_BYTES))], ProtocolError),
    "a large frame of another request": (lambda rid: [
        result(rid, (1, 2, 4)), frame("other", "t1", 0, bytes(2 * DIRECT_READ_BYTES))],
        ProtocolError),
    "a large frame past its tensor's bytes": (lambda rid: [
        result(rid, (1, 2, 4)), frame(rid, "t1", 0, bytes(2 * DIRECT_READ_BYTES))],
        FrameError),
}


@pytest.fixture(scope="module")
def hostile_server():
    """A websocket server that greets like hookwire, then answers a submit with a lie."""
    lie = {}

    def handler(ws):
        for message in ws:
            if isinstance(message, bytes):
                continue
            msg = json.loads(message)
            if msg["type"] == "hello":
                ws.send(json.dumps({"type": "hello_ok", "protocol": 1, "server_version": "evil",
                                    "models": ["m"]}))
            elif msg["type"] == "model_info":
                ws.send(json.dumps(MODEL_INFO))
            elif msg["type"] == "submit":
                for out in lie["make"](msg["request_id"]):
                    ws.send(out)

    server = serve(handler, "127.0.0.1", 0, max_size=None, compression=None)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"ws://127.0.0.1:{server.socket.getsockname()[1]}", lie
    finally:
        server.shutdown()
        thread.join(10)


@pytest.mark.parametrize("name", list(LIES))
def test_client_refuses_a_lying_server(hostile_server, name):
    url, lie = hostile_server
    make, error = LIES[name]
    lie["make"] = make
    conn = Connection(url)
    if name != "a pickle as a result's bytes":  # (without it, names are checked, not sizes)
        conn.model_info("m")
    got = {}
    try:
        with pytest.raises(HookwireError) as info:
            conn.run(GRAPH, {"input_ids": torch.zeros(1, 2, dtype=torch.int64)},
                     on_value=lambda n, v: got.__setitem__(n, v))
        assert isinstance(info.value, error), repr(info.value)
        if name == "a pickle as a result's bytes":  # handed over as the inert bytes they are
            assert torch.equal(got.pop("x"), torch.frombuffer(bytearray(PICKLE), dtype=torch.uint8))
        if name == "the same result twice":  # the first one was a proper answer
            assert torch.equal(got.pop("x"), torch.zeros(1, 2, 4))
        assert got == {}
        assert not PAYLOAD_MARKER.exists()
    finally:
        conn.close()


def test_a_lying_model_info_answer_drops_the_connection():
    """Binary data where ``model_info`` was due: a ``ProtocolError``, and the connection is
    never reused (the pool skips it), since the real answer may still be on its way."""
    def handler(ws):
        for message in ws:
            if isinstance(message, str) and json.loads(message)["type"] == "hello":
                ws.send(json.dumps({"type": "hello_ok", "protocol": 1,
                                    "server_version": "evil", "models": ["m"]}))
            elif isinstance(message, str):
                ws.send(b"\0\0\0\0")

    server = serve(handler, "127.0.0.1", 0, max_size=None, compression=None)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    conn = Connection(f"ws://127.0.0.1:{server.socket.getsockname()[1]}")
    try:
        with pytest.raises(ProtocolError, match="binary"):
            conn.model_info("m")
        assert conn.broken and conn.session.open
    finally:
        conn.close()
        server.shutdown()
        thread.join(10)
