"""Sending a result's frame: its websocket frame header, then its bytes as they are.

websockets' ``send`` serializes every frame into a new buffer before writing it -- for a
result, a copy of every byte it sends (206 MB of logits: ~0.2 GB of copying on the loop
thread). A frame from the server is not masked, so its payload needs no change: here the
header is written to the transport and the message's own bytes after it, and the transport
copies only what the socket does not take at once. Flow control is websockets' (``drain``).
Anything else -- text, small frames, a connection no longer open -- goes through ``send``.
"""
from __future__ import annotations

import struct

from websockets.asyncio.connection import Connection
from websockets.exceptions import ConnectionClosedError
from websockets.protocol import State

# Below this a frame is cheap to serialize; above it the copy is what costs.
DIRECT_BYTES = 64 << 10
_BINARY_FIN = 0x82  # FIN bit and the binary opcode


def frame_header(length: int) -> bytes:
    """RFC 6455 header of an unmasked, final binary frame of ``length`` payload bytes."""
    if length < 126:
        return struct.pack("!BB", _BINARY_FIN, length)
    if length < 1 << 16:
        return struct.pack("!BBH", _BINARY_FIN, 126, length)
    return struct.pack("!BBQ", _BINARY_FIN, 127, length)


async def send_binary(ws: Connection, data: bytes) -> None:
    """Send ``data`` as one binary message on ``ws`` (websockets' asyncio server
    connection), without serializing a copy of it when it is large."""
    drain = getattr(ws, "drain", None)  # websockets' flow control (not a documented name)
    if len(data) < DIRECT_BYTES or drain is None or ws.protocol.state is not State.OPEN:
        await ws.send(data)  # (a closed connection raises here, as it always did)
        return
    try:
        # Two writes with no await between them: nothing else of this connection's
        # (websockets writes its own frames, pings and closes, on this loop too) can come
        # between.
        ws.transport.write(frame_header(len(data)))
        ws.transport.write(data)
        await drain()
    except OSError as exc:
        # The connection was lost (a reset reaches the waiting drain): websockets' send
        # raises ConnectionClosed for this, and the server's writer expects no other.
        raise ConnectionClosedError(ws.protocol.close_rcvd, ws.protocol.close_sent) from exc


__all__ = ["send_binary", "frame_header", "DIRECT_BYTES"]
