"""The client's websocket: websockets' sans-I/O protocol, with large binary frames read
straight from the socket.

Why not websockets' own synchronous client (``websockets.sync``), which the client used
until the twenty-first session: results are mostly large tensors sent in 1 MiB binary frames,
and that client copies every payload four times on its way to the caller (the socket's
``recv`` into a fresh ``bytes``, that into the protocol's stream buffer, the frame's slice of
it, the message's ``join``), then the caller copies it once more into the tensor. On 206 MB
of logits (P1, ``bench/README.md``) those copies were most of the time a remote call spent
after the server's forward. Here a binary frame of at least :data:`DIRECT_READ_BYTES` whose
header allows it (final, unmasked, no extension bits, no fragmented message open) has its
payload read from the socket as one ``bytes`` object: one copy from the kernel, none
after.

Everything else -- the opening handshake and its refusals (``InvalidStatus``), text and
small binary frames, fragments, pings, the closing handshake, size limits, protocol errors --
goes through websockets' :class:`~websockets.client.ClientProtocol` unchanged: each such
frame's bytes are fed to it whole. Frames read directly never reach it, and need not: they
are complete data frames of an open connection, which change none of its state.

The connection reads in the caller's thread (no reader thread); ``send`` may be called from
another thread (``cancel`` while a result streams in).
"""
from __future__ import annotations

import select
import socket
import ssl
import struct
import threading
import time
from collections import deque

from websockets.client import ClientProtocol
from websockets.exceptions import ConnectionClosed, ConnectionClosedError, InvalidMessage
from websockets.frames import Frame, Opcode
from websockets.protocol import State
from websockets.uri import parse_uri

from hookwire.errors import ProtocolError

# A binary frame this large is read into a buffer of its own; smaller frames are few bytes
# and cost nothing to feed to the protocol.
DIRECT_READ_BYTES = 64 << 10
_HANDSHAKE_READ = 1 << 16


class WebsocketConnection:
    """One client websocket (RFC 6455) to ``url``; see the module's docstring. The surface
    is what hookwire's client uses of websockets' ``ClientConnection``: ``send``, ``recv``,
    ``close``, ``socket`` and ``protocol`` (its ``state``)."""

    def __init__(self, url: str, headers: dict | None = None, open_timeout: float = 30,
                 max_size: int = 1 << 20):
        uri = parse_uri(url)
        deadline = time.monotonic() + open_timeout
        sock = socket.create_connection((uri.host, uri.port), timeout=open_timeout)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, True)
            if uri.secure:
                sock = ssl.create_default_context().wrap_socket(sock, server_hostname=uri.host)
            self.socket = sock
            self.max_size = max_size
            self.protocol = ClientProtocol(uri, max_size=max_size)
            self._mutex = threading.Lock()  # the protocol and the socket's writes
            self._messages: deque = deque()  # complete messages parsed, not yet returned
            self._fragments: list | None = None  # a fragmented message being received
            self._handshake(headers, deadline)
            sock.settimeout(None)
        except BaseException:
            sock.close()
            raise

    # -- opening -------------------------------------------------------------------------

    def _handshake(self, headers, deadline: float) -> None:
        request = self.protocol.connect()
        if headers:
            request.headers.update(headers)
        self.protocol.send_request(request)
        self._write()
        # Read the response's head only (up to its blank line): the frames after it are this
        # connection's to read. A refusal's body is read to its end by the protocol.
        head = bytearray()
        while b"\r\n\r\n" not in head:
            self.socket.settimeout(max(deadline - time.monotonic(), 1e-3))
            if isinstance(self.socket, ssl.SSLSocket):  # TLS cannot peek: a byte at a time
                data = self.socket.recv(1)
            else:
                peeked = self.socket.recv(_HANDSHAKE_READ, socket.MSG_PEEK)
                kept = min(len(head), 3)  # the blank line may straddle two reads
                end = (bytes(head[len(head) - kept:]) + peeked).find(b"\r\n\r\n")
                data = self.socket.recv(len(peeked) if end < 0 else end + 4 - kept) \
                    if peeked else b""
            if not data:
                break
            head += data
            self.protocol.receive_data(data)
            self.protocol.events_received()
        # A refusal's body (and an early end of the stream) the protocol reads to its end.
        while self.protocol.state is not State.OPEN and self.protocol.handshake_exc is None:
            if not data:
                self.protocol.receive_eof()
                break
            self.socket.settimeout(max(deadline - time.monotonic(), 1e-3))
            data = self.socket.recv(_HANDSHAKE_READ)
            if data:
                self.protocol.receive_data(data)
            self.protocol.events_received()
        if self.protocol.handshake_exc is not None:
            raise self.protocol.handshake_exc
        if self.protocol.state is not State.OPEN:
            raise InvalidMessage("the server did not complete the websocket handshake")

    # -- sending -------------------------------------------------------------------------

    def _write(self) -> None:
        """Send what the protocol has queued (call with ``_mutex`` held, or before any other
        thread has the connection)."""
        for data in self.protocol.data_to_send():
            if data:
                self.socket.sendall(data)
            else:  # the protocol ends the stream (after a closing handshake)
                try:
                    self.socket.shutdown(socket.SHUT_WR)
                except OSError:
                    pass

    def send(self, message) -> None:
        """Send a text (``str``) or binary message."""
        with self._mutex:
            if self.protocol.state is not State.OPEN:
                raise self._closed_error()
            if isinstance(message, str):
                self.protocol.send_text(message.encode())
            else:
                self.protocol.send_binary(message)
            try:
                self._write()
            except OSError as exc:  # the server went away: as websockets' client said it
                raise ConnectionClosedError(None, None) from exc

    # -- receiving -----------------------------------------------------------------------

    def recv(self, timeout: float | None = None):
        """The next message: ``str`` for text, a bytes-like object for binary. ``timeout``
        bounds the wait for a message to start (``TimeoutError``); once a frame has begun
        it is read to its end. Raises ``ConnectionClosed`` once the connection is closed."""
        while not self._messages:
            if self.protocol.state is State.CLOSED:
                raise self._closed_error()
            if timeout is not None and not self._readable(timeout):
                raise TimeoutError(f"no message within {timeout} s")
            self._read_frame()
        return self._messages.popleft()

    def _readable(self, timeout: float) -> bool:
        if isinstance(self.socket, ssl.SSLSocket) and self.socket.pending():
            return True
        poller = select.poll()  # (select() cannot watch descriptors past FD_SETSIZE)
        poller.register(self.socket, select.POLLIN)
        return bool(poller.poll(max(timeout, 0) * 1000))

    def _read_into(self, view: memoryview) -> None:
        while view:
            n = self.socket.recv_into(view)
            if n == 0:
                raise EOFError
            view = view[n:]

    def _read(self, n: int) -> bytearray:
        buf = bytearray(n)
        self._read_into(memoryview(buf))
        return buf

    def _read_payload(self, n: int) -> bytes:
        """``n`` bytes as ``bytes`` (what websockets' client returned), copied once from the
        kernel: ``recv`` with ``MSG_WAITALL`` makes them without zero-filling first. A TLS
        socket takes no flags: it reads into a buffer, copied once more."""
        if isinstance(self.socket, ssl.SSLSocket):
            return bytes(self._read(n))
        data = self.socket.recv(n, socket.MSG_WAITALL)
        if len(data) == n:
            return data
        if not data:
            raise EOFError
        # Interrupted by a signal: the rest, then one join.
        return b"".join((data, self._read(n - len(data))))

    def _read_frame(self) -> None:
        """Read one frame; a complete message it ends goes to ``_messages``."""
        try:
            head = self._read(2)
            length = head[1] & 0x7F
            extended = b""
            if length == 126:
                extended = bytes(self._read(2))
                (length,) = struct.unpack("!H", extended)
            elif length == 127:
                extended = bytes(self._read(8))
                (length,) = struct.unpack("!Q", extended)
            direct = (head[0] == 0x82 and not head[1] & 0x80 and self._fragments is None
                      and DIRECT_READ_BYTES <= length <= self.max_size
                      and self.protocol.state is State.OPEN)
            if direct:
                self._messages.append(self._read_payload(length))
                return
            # Everything else through the protocol: the header first (it refuses a frame
            # too large, or masked, before its payload is read), then the payload.
            with self._mutex:
                self.protocol.receive_data(bytes(head) + extended)
                events = self.protocol.events_received()
                self._write()
            if self.protocol.state is State.OPEN:
                payload = self._read(length + (4 if head[1] & 0x80 else 0))
                with self._mutex:
                    self.protocol.receive_data(payload)
                    events += self.protocol.events_received()
                    self._write()
        except (EOFError, OSError) as exc:
            with self._mutex:
                self.protocol.receive_eof()
                events = self.protocol.events_received()
                try:
                    self._write()
                except OSError:
                    pass
            self._close_socket()
            if self.protocol.state is not State.CLOSED:  # pragma: no cover - eof closes it
                raise ConnectionClosedError(None, None) from exc
        for event in events:
            if isinstance(event, Frame):  # (after the handshake the protocol makes no other)
                self._on_frame(event)
        if self.protocol.state is not State.OPEN:
            # A close frame came (answered by the protocol above) or the protocol failed the
            # connection: nothing more will be read.
            self._close_socket()

    def _on_frame(self, frame: Frame) -> None:
        if frame.opcode in (Opcode.TEXT, Opcode.BINARY):
            if frame.fin:
                self._messages.append(_message(frame.opcode, [frame.data]))
            else:
                self._fragments = [frame]
        elif frame.opcode is Opcode.CONT and self._fragments is not None:
            self._fragments.append(frame)
            if frame.fin:
                first = self._fragments[0]
                self._messages.append(_message(first.opcode,
                                               [f.data for f in self._fragments]))
                self._fragments = None
        # pings are answered by the protocol; pongs and close frames need nothing here

    # -- closing -------------------------------------------------------------------------

    def _closed_error(self) -> ConnectionClosed:
        if self.protocol.state is State.CLOSED:
            return self.protocol.close_exc
        return ConnectionClosedError(self.protocol.close_rcvd, self.protocol.close_sent)

    def _close_socket(self) -> None:
        try:
            self.socket.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.socket.close()
        with self._mutex:
            if self.protocol.state is not State.CLOSED:
                self.protocol.receive_eof()  # the protocol's state follows the socket's
                self.protocol.events_received()
                self.protocol.data_to_send()

    def is_open(self, idle: bool = False) -> bool:
        """Open (as far as has been read). ``idle``: no exchange is in flight, so nothing is
        expected to arrive -- a server says nothing between requests, and a readable socket
        then means it closed (or broke) the connection."""
        if not idle or self.protocol.state is not State.OPEN or self._messages:
            return self.protocol.state is State.OPEN
        try:
            return not self._readable(0)
        except (OSError, ValueError):
            return False

    def close(self) -> None:
        """Send a close frame (when still open) and close the socket; no wait for the
        server's answer (it may still be streaming results nobody will read)."""
        with self._mutex:
            if self.protocol.state is State.OPEN:
                try:
                    self.protocol.send_close()
                    self._write()
                except OSError:
                    pass
        self._close_socket()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _message(opcode: Opcode, parts: list):
    data = b"".join(parts)  # bytes, as websockets' client gave (frames hold bytearrays)
    if opcode is not Opcode.TEXT:
        return data
    try:
        return bytes(data).decode()
    except UnicodeDecodeError:
        raise ProtocolError("the server sent a text message that is not UTF-8") from None


__all__ = ["WebsocketConnection", "DIRECT_READ_BYTES"]
