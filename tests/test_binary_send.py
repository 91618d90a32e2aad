"""``server/binary_send.py``: a large result frame written to the transport after its own
header arrives byte for byte (websockets' own client and hookwire's both read it), keeps
websockets' flow control (a client that stops reading stops the sender), and a closed
connection raises as websockets' ``send`` did. Real sockets on 127.0.0.1."""
from __future__ import annotations

import asyncio
import os
import socket
import struct
import threading
import time

import pytest
from websockets.asyncio.server import serve
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from hookwire.server.binary_send import DIRECT_BYTES, frame_header, send_binary
from hookwire.ws_connection import WebsocketConnection

pytestmark = pytest.mark.xdist_group("binary_send")

SIZES = [0, 1, 125, 126, 65535, 65536, DIRECT_BYTES - 1, DIRECT_BYTES, (1 << 20) + 4096 + 7,
         3 << 20]
PAYLOADS = [os.urandom(n) for n in SIZES]


class LoopServer:
    """A websockets asyncio server in a thread of its own, running ``handler``."""

    def __init__(self, handler, **kwargs):
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.handler, self.kwargs = handler, kwargs
        self.thread = threading.Thread(target=self.loop.run_until_complete, args=(self._main(),),
                                       daemon=True)

    async def _main(self):
        self.stop = asyncio.Event()
        async with serve(self.handler, "127.0.0.1", 0, compression=None, **self.kwargs) as srv:
            self.url = f"ws://127.0.0.1:{srv.sockets[0].getsockname()[1]}"
            self.ready.set()
            await self.stop.wait()

    def __enter__(self):
        self.thread.start()
        assert self.ready.wait(10)
        return self

    def __exit__(self, *exc):
        self.loop.call_soon_threadsafe(self.stop.set)
        self.thread.join(10)
        self.loop.close()


def test_the_header_is_rfc6455s():
    assert frame_header(5) == bytes([0x82, 5])
    assert frame_header(126) == bytes([0x82, 126, 0, 126])
    assert frame_header(1 << 16) == bytes([0x82, 127]) + (1 << 16).to_bytes(8, "big")


@pytest.mark.parametrize("client", ["hookwire", "websockets"])
def test_frames_of_every_size_arrive_as_sent(client):
    async def handler(ws):
        await ws.recv()
        for payload in PAYLOADS:
            await send_binary(ws, payload)
            await ws.send("between")  # websockets' own frames interleave cleanly
        await ws.recv()

    with LoopServer(handler, max_size=1 << 20) as server:
        if client == "hookwire":
            conn = WebsocketConnection(server.url, max_size=8 << 20)
        else:
            conn = connect(server.url, compression=None, max_size=8 << 20)
        try:
            conn.send("go")
            for payload in PAYLOADS:
                assert conn.recv(timeout=30) == payload
                assert conn.recv(timeout=30) == "between"
            conn.send("bye")
        finally:
            conn.close()


def test_a_client_that_stops_reading_stops_the_sender():
    sent = []

    async def handler(ws):
        await ws.recv()
        for k in range(64):  # 64 MiB, far past the socket's and the transport's buffers
            await send_binary(ws, bytes(1 << 20))
            sent.append(k)
        await ws.recv()

    with LoopServer(handler, write_limit=1 << 20) as server:
        conn = WebsocketConnection(server.url, max_size=2 << 20)
        conn.send("go")
        time.sleep(1.0)
        stalled_at = len(sent)
        assert stalled_at < 32, "the sender did not wait for the client to read"
        for _ in range(64):
            assert len(conn.recv(timeout=30)) == 1 << 20
        conn.send("bye")
        conn.close()
    assert len(sent) == 64


def test_a_closed_connection_raises_as_websockets_send_did():
    outcome = []

    async def handler(ws):
        await ws.recv()
        await ws.close()
        try:
            await send_binary(ws, bytes(DIRECT_BYTES * 2))
        except ConnectionClosed as exc:
            outcome.append(exc)

    with LoopServer(handler) as server:
        conn = WebsocketConnection(server.url)
        conn.send("go")
        with pytest.raises(ConnectionClosed):
            conn.recv(timeout=30)
        deadline = time.monotonic() + 10
        while not outcome and time.monotonic() < deadline:
            time.sleep(0.02)
    assert len(outcome) == 1 and isinstance(outcome[0], ConnectionClosed)


def test_a_reset_while_the_sender_waits_raises_connection_closed():
    outcome = []

    async def handler(ws):
        await ws.recv()
        try:
            for _ in range(64):  # the client reads nothing: the sender waits in drain
                await send_binary(ws, bytes(1 << 20))
        except Exception as exc:
            outcome.append(exc)

    with LoopServer(handler, write_limit=1 << 20) as server:
        conn = WebsocketConnection(server.url, max_size=2 << 20)
        conn.send("go")
        time.sleep(0.5)
        # An abortive close: the server's socket gets a reset, not an end of stream.
        conn.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        conn.socket.close()
        deadline = time.monotonic() + 10
        while not outcome and time.monotonic() < deadline:
            time.sleep(0.02)
    assert len(outcome) == 1 and isinstance(outcome[0], ConnectionClosed), outcome
