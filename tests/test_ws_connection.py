"""The client's websocket (``hookwire.ws_connection``) against a real websockets server on
127.0.0.1: large binary frames read straight from the socket arrive byte for byte, and
everything the protocol handles -- fragments, pings, refusals, closes, size limits, bad
UTF-8 -- behaves as websockets' own client did. (Every remote call of the suite goes through
it too; these are the cases a hookwire server never produces.)"""
from __future__ import annotations

import contextlib
import os
import socket
import threading
import time

import pytest
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus
from websockets.sync.server import serve

from hookwire.errors import ProtocolError
from hookwire.ws_connection import DIRECT_READ_BYTES, WebsocketConnection

pytestmark = pytest.mark.xdist_group("ws_connection")

BIG = os.urandom(3 * DIRECT_READ_BYTES + 17)  # read straight from the socket
SMALL = os.urandom(100)  # fed to websockets' protocol


@contextlib.contextmanager
def websocket_server(handler, **kwargs):
    """A websockets sync server on 127.0.0.1 running ``handler`` per connection."""
    server = serve(handler, "127.0.0.1", 0, compression=None, **kwargs)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"ws://127.0.0.1:{server.socket.getsockname()[1]}"
    finally:
        server.shutdown()
        thread.join(10)


def test_messages_of_every_kind_arrive_as_sent():
    def handler(ws):
        for message in ws:
            if message == "all":
                ws.send(BIG)
                ws.send(SMALL)
                ws.send("text é")
                ws.send([b"frag", b"mented", BIG])  # one binary message in three frames
                ws.send(["te", "xt"])
                ws.send(BIG + BIG)
            else:
                ws.send(message)  # echo

    with websocket_server(handler) as url:
        conn = WebsocketConnection(url, max_size=1 << 22)
        conn.send("all")
        got = [conn.recv(timeout=30) for _ in range(6)]
        assert [bytes(g) if not isinstance(g, str) else g for g in got] == [
            BIG, SMALL, "text é", b"fragmented" + BIG, "text", BIG + BIG]
        conn.send(BIG)  # a large upload, masked by the protocol
        assert bytes(conn.recv(timeout=30)) == BIG
        conn.close()


def test_pings_are_answered_while_a_large_message_streams():
    answered = threading.Event()

    def handler(ws):
        ws.recv()
        ws.send(BIG)
        ws.ping().wait(10) and answered.set()
        ws.send("after the ping")

    with websocket_server(handler) as url:
        conn = WebsocketConnection(url)
        conn.send("go")
        assert bytes(conn.recv(timeout=30)) == BIG
        assert conn.recv(timeout=30) == "after the ping"
        assert answered.wait(10)
        conn.close()


def test_a_server_that_closes_is_seen_closed():
    def handler(ws):
        ws.recv()
        ws.send(BIG)
        ws.close(1001, "going away")

    with websocket_server(handler) as url:
        conn = WebsocketConnection(url)
        assert conn.is_open(idle=True)
        conn.send("go")
        assert bytes(conn.recv(timeout=30)) == BIG
        with pytest.raises(ConnectionClosed) as info:
            conn.recv(timeout=30)
        assert info.value.rcvd.code == 1001
        assert not conn.is_open()
        with pytest.raises(ConnectionClosed):
            conn.send("more")


def test_an_idle_connection_the_server_dropped_is_not_open():
    def handler(ws):
        ws.recv()
        ws.close()

    with websocket_server(handler) as url:
        conn = WebsocketConnection(url)
        conn.send("bye")
        deadline = time.monotonic() + 10
        while conn.is_open(idle=True) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not conn.is_open(idle=True)
        # Not idle (an exchange in flight): what is readable is its answer, not a close.
        conn2 = WebsocketConnection(url)
        conn2.send("bye")
        time.sleep(0.3)
        assert conn2.is_open(idle=False)
        conn.close()
        conn2.close()


@pytest.mark.parametrize("size", [DIRECT_READ_BYTES * 4, 2000])
def test_a_message_over_the_size_limit_closes_the_connection_unread(size):
    def handler(ws):
        ws.recv()
        ws.send(os.urandom(size))
        time.sleep(1)

    with websocket_server(handler) as url:
        conn = WebsocketConnection(url, max_size=1000)
        conn.send("go")
        with pytest.raises(ConnectionClosed) as info:
            conn.recv(timeout=30)
        assert info.value.sent is not None and info.value.sent.code == 1009


def test_text_that_is_not_utf8_is_a_protocol_error():
    def handler(ws):
        ws.recv()
        ws.send(b"\xff\xfe", text=True)  # a text frame whose bytes are not UTF-8
        time.sleep(1)

    with websocket_server(handler) as url:
        conn = WebsocketConnection(url)
        conn.send("go")
        with pytest.raises(ProtocolError, match="UTF-8"):
            conn.recv(timeout=30)


def test_recv_times_out_and_a_send_from_another_thread_goes_through():
    def handler(ws):
        for message in ws:
            ws.send(message)

    with websocket_server(handler) as url:
        conn = WebsocketConnection(url)
        with pytest.raises(TimeoutError):
            conn.recv(timeout=0.2)
        sender = threading.Timer(0.3, conn.send, args=("from another thread",))
        sender.start()
        assert conn.recv(timeout=30) == "from another thread"
        sender.join()
        conn.close()


def test_a_refused_handshake_raises_the_servers_status():
    def refuse(connection, request):
        return connection.respond(401, "no key here\n")

    with websocket_server(lambda ws: None, process_request=refuse) as url:
        with pytest.raises(InvalidStatus) as info:
            WebsocketConnection(url, headers={"Authorization": "Bearer nope"})
        assert info.value.response.status_code == 401
        assert b"no key here" in info.value.response.body


def test_a_server_that_closes_before_answering_fails_the_handshake():
    listener = socket.create_server(("127.0.0.1", 0))

    def accept_and_close():
        sock, _ = listener.accept()
        sock.recv(4096)
        sock.close()

    thread = threading.Thread(target=accept_and_close, daemon=True)
    thread.start()
    try:
        with pytest.raises((InvalidHandshake, ConnectionResetError)):
            WebsocketConnection(f"ws://127.0.0.1:{listener.getsockname()[1]}", open_timeout=10)
    finally:
        thread.join(10)
        listener.close()


def test_frames_sent_right_after_the_handshake_are_not_lost():
    def greet(ws):
        ws.send(BIG)  # before the client says anything
        ws.send("hello")
        ws.recv()

    with websocket_server(greet) as url:
        conn = WebsocketConnection(url)
        assert bytes(conn.recv(timeout=30)) == BIG
        assert conn.recv(timeout=30) == "hello"
        conn.close()

