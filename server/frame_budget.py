"""What a connection's incoming frames cost, counted before it is paid: memory and the front's time.

websockets reads a message whole before the server sees it: a frame's header announces its
length, then its payload is buffered, unmasked and (for text) decoded -- up to
``max_message_bytes`` (64 MiB by default) for each connection, and, with one message read
ahead, twice that. Nothing counted it: a tenant's 32 connections, each sending a maximal
message, made the server hold gigabytes outside its memory budget (SECURITY.md, class 5).

:class:`FrameBudget` counts each large frame when its header has been read and before a byte
of its payload is buffered: it reserves ``COPIES`` times the payload's length in the server's
:class:`~hookwire.server.memory.MemoryBudget`, for the connection's user and server-wide, as
an upload is. Where there is no room, the connection stops reading (TCP holds the sender
back) and tries again, after ``RETRY_S`` and then less and less often (up to
``MAX_RETRY_S``), until requests end and give memory back; nothing is refused or lost. The
bytes go back once the server has handled the message. A counted frame must arrive within
``submit_timeout_s`` (as a submit's uploads must), or its connection is closed (1008): a
header alone must not hold a whole frame's count for long. A frame larger
than the user's whole budget could never be counted: such frames are refused at their header
(close code 1009, as for ``max_message_bytes``).

The loop's time taking in a connection's bytes is charged to its user's share of the front
too (:class:`~hookwire.server.intake.FrontShare`), measured around websockets'
``data_received``: parsing every frame, answering pings. Pings and pongs never reach the
server's handler, which charges messages, so a tenant sending pings as fast as TCP takes them
held the event loop (~36 us a ping with its pong, 43,000 pings in one 256 KiB read) and a
co-tenant's request waited up to 12 s (``bench/bench_fairness.py`` ping_flood). Now parsing
stops after ``SLICE_S`` of one read, letting the loop run others, and while the user is over
its share its connection is not read until the user is back in credit.

Frames of at most ``UNCOUNTED_BYTES`` -- a tensor's 1 MiB chunk with its header, a typical
control message -- are not counted: their uploads were reserved when their submit declared
them, and what a connection holds of them is bounded by its read-ahead.

It hooks into websockets' asyncio connection (its stream reader's ``read_exact``, its
message assembler's ``put`` and flow control), the internals ``ConnState.more_coming`` reads
too; ``websockets>=14`` has them.
"""
from __future__ import annotations

import time
from collections import deque

from websockets.protocol import State

from hookwire.errors import LimitExceeded
from hookwire.frames import CHUNK_BYTES, MAX_HEADER_BYTES

# A frame up to this size is not counted: a tensor chunk with its header, as clients send
# them (the session refuses larger binary frames: ``server.session.MAX_FRAME_BYTES``).
UNCOUNTED_BYTES = CHUNK_BYTES + MAX_HEADER_BYTES + 4
# What a frame of n bytes holds at once: its payload as websockets buffers and unmasks it,
# then the message and (text) its decoded string while the server parses it.
COPIES = 2
# How soon a connection waiting for room first tries again; each try that finds none doubles
# the wait, up to MAX_RETRY_S (a thousand waiting connections must not keep the loop busy).
RETRY_S = 0.02
MAX_RETRY_S = 0.32
# The longest a connection over its user's share waits before it looks again.
MAX_THROTTLE_S = 0.1
# The loop's CPU time one connection's bytes may take before others get the loop.
SLICE_S = 0.002


def check_websockets() -> None:
    """Raise ``ImportError`` unless the installed websockets has the internals
    :class:`FrameBudget` hooks into (a server must not run without counting them)."""
    from websockets.asyncio.messages import Assembler
    from websockets.server import ServerProtocol

    protocol = ServerProtocol()
    if not (hasattr(protocol, "max_message_size") and callable(
            getattr(protocol.reader, "read_exact", None)) and
            all(hasattr(Assembler, a) for a in ("put", "maybe_pause", "maybe_resume"))):
        import websockets
        raise ImportError(f"websockets {websockets.__version__} lacks the internals hookwire's "
                          "server counts incoming messages with (server/frame_budget.py); "
                          "install websockets>=15")


check_websockets()


class FrameBudget:
    """What one connection's incoming frames cost, for ``user``: large frames counted in
    ``memory`` (a :class:`~hookwire.server.memory.MemoryBudget`; None: not counted), the
    loop's time taking in its bytes charged to ``share`` (a
    :class:`~hookwire.server.intake.FrontShare`; None: not charged). Built in the
    connection's handler, on the loop, before its first message is read; ``message_done()``
    after each message the handler has finished with; ``close()`` when the connection ends
    (everything still counted goes back)."""

    def __init__(self, ws, memory, user: str, share=None, frame_timeout_s: float = 60.0):
        self.ws, self.memory, self.user, self.share = ws, memory, user, share
        self.frame_timeout_s = frame_timeout_s
        self.frames: deque[int] = deque()    # bytes counted for frames being read, in order
        self.current = 0                     # ... for the frames of the message being built
        self.messages: deque[int] = deque()  # ... for each message handed over, in order
        self.waiting = False                 # reading stopped for want of room
        self.waits = 0                       # times a frame waited (diagnostics, tests)
        self.retries = 0                     # times a waiting frame tried again (same)
        self._give_way = False               # the next frame waits (slice or share)
        self._assembler_paused = False
        self._timer = None
        self.closed = memory is None and share is None
        if self.closed:
            return
        protocol = ws.protocol
        if memory is not None:
            limit = protocol.max_message_size
            room = memory.per_user // COPIES
            protocol.max_message_size = room if limit is None else min(limit, room)
        self._recv_frame = protocol.recv_frame
        protocol.recv_frame = self._timed_recv_frame
        self._slice_start = time.thread_time()
        self._data_received = ws.data_received
        ws.data_received = self._timed_data_received
        reader, assembler = protocol.reader, ws.recv_messages
        self._read_exact = reader.read_exact
        reader.read_exact = self._counted_read_exact
        self._put = assembler.put
        assembler.put = self._counted_put
        self._assembler_paused = assembler.paused
        assembler.pause, assembler.resume = self._assembler_pause, self._assembler_resume

    # ---- websockets' side (on the loop) --------------------------------------------------
    def _counted_read_exact(self, n: int):
        """The stream reader's ``read_exact``: a large read is a frame's payload (its header
        has been read); it is counted before it is buffered, waiting for room if needed.
        Nothing more is parsed while the user is over its share of the front."""
        if self._give_way:
            # This read took its slice of the loop: let others run, then go on once the user
            # is within its share of the front.
            self._give_way = False
            self._charge_slice()
            first = True
            while not self.closed and self.ws.protocol.state is State.OPEN and \
                    not self.ws.protocol.reader.eof:
                wait = self.share.wait_needed(self.user) if self.share is not None else 0.0
                if wait <= 0 and not first:
                    break
                first = False
                wait = min(wait, MAX_THROTTLE_S) if wait > 0 else 0.0
                if wait > 0:
                    self.share.waiting(self.user, wait)
                self._wait(wait)
                yield
            if self.waiting:
                self._stop_waiting()
        if n > UNCOUNTED_BYTES and self.memory is not None and not self.closed:
            retry_s = RETRY_S
            while not self._reserve(n):
                if self.ws.protocol.reader.eof:
                    raise EOFError("the connection ended while a frame waited for memory")
                if self.closed or self.ws.protocol.state is not State.OPEN:
                    break  # closing: its closing handshake must be read (one frame, uncounted)
                self._wait(retry_s)
                retry_s = min(2 * retry_s, MAX_RETRY_S)
                yield  # stepped again by _retry (or by data arriving before the pause)
            if self.waiting:
                self._stop_waiting()
            # Counted from its header: it must arrive in time, or the sender of a header alone
            # would hold the count of a whole frame (as an unfinished submit holds its uploads'
            # until submit_timeout_s).
            deadline = self.ws.loop.call_later(self.frame_timeout_s, self._too_slow, n)
            try:
                return (yield from self._read_exact(n))
            finally:
                deadline.cancel()
        return (yield from self._read_exact(n))

    def _too_slow(self, n: int) -> None:
        """A counted frame did not arrive within ``frame_timeout_s``: the connection is
        closed (1008, policy violation), and what it counted goes back when it ends."""
        if self.closed:
            return
        self.ws.loop.create_task(self.ws.close(
            1008, f"a frame of {n} bytes did not arrive within {self.frame_timeout_s:g} s"))

    def _reserve(self, n: int) -> bool:
        try:
            self.memory.reserve(self.user, COPIES * n, "a message being received")
        except LimitExceeded:
            return False
        self.frames.append(COPIES * n)
        return True

    def _timed_data_received(self, data) -> None:
        """websockets' ``data_received`` (bytes read from the socket, or a retry's nudge):
        its loop time is charged to the user; over the user's share, the next frame waits."""
        self._slice_start = time.thread_time()
        try:
            self._data_received(data)
        finally:
            self._charge_slice()
            if self.share is not None and not self.closed and \
                    self.share.wait_needed(self.user) > 0:
                self._give_way = True

    def _charge_slice(self) -> None:
        now = time.thread_time()
        if self.share is not None and not self.closed:
            self.share.charge_receiving(self.user, now - self._slice_start)
        self._slice_start = now

    def _timed_recv_frame(self, frame) -> None:
        """The protocol's ``recv_frame``, for every frame parsed (pings and pongs too): once
        this read has held the loop ``SLICE_S``, the next frame waits (``_give_way``)."""
        self._recv_frame(frame)
        if time.thread_time() - self._slice_start > SLICE_S:
            self._give_way = True

    def _counted_put(self, frame) -> None:
        """The assembler's ``put``: a data frame is complete; its count moves to its
        message, which is handed over once its last frame is in."""
        if len(frame.data) > UNCOUNTED_BYTES and self.frames:
            self.current += self.frames.popleft()
        if frame.fin:
            self.messages.append(self.current)
            self.current = 0
        self._put(frame)

    def _assembler_pause(self) -> None:
        self._assembler_paused = True
        self.ws.transport.pause_reading()

    def _assembler_resume(self) -> None:
        self._assembler_paused = False
        if not self.waiting:
            self.ws.transport.resume_reading()

    def _wait(self, seconds: float) -> None:
        if not self.waiting:
            self.waiting = True
            self.waits += 1
            self.ws.transport.pause_reading()
        if self._timer is None:
            self._timer = self.ws.loop.call_later(seconds, self._retry)

    def _stop_waiting(self) -> None:
        self.waiting = False
        if not self._assembler_paused:
            self.ws.transport.resume_reading()

    def _retry(self) -> None:
        """Step the parser, which is waiting in ``_counted_read_exact``: it tries to count
        its frame again."""
        self._timer = None
        if not self.waiting:
            return
        self.retries += 1
        if self.ws.protocol.reader.eof or self.ws.transport.is_closing():
            # The connection is ending: parse nothing more. (Parsing the rest of what it
            # sent would answer its pings into a closed socket, and asyncio logs a warning
            # for each such write: ~1,200 lines a ping-flooding tenant's disconnect.)
            self._stop_waiting()
            return
        self._timed_data_received(b"")  # (what it parses is this connection's loop time)

    # ---- the handler's side -------------------------------------------------------------
    def message_done(self) -> None:
        """The handler is done with the oldest message it was handed: its bytes go back."""
        if self.messages:
            self._release(self.messages.popleft())

    def close(self) -> None:
        """The connection ended: whatever is still counted goes back."""
        if self.closed:
            return
        self.closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self.waiting:  # (a closing handshake still reads)
            self._stop_waiting()
        self._release(sum(self.frames) + self.current + sum(self.messages))
        self.frames.clear()
        self.messages.clear()
        self.current = 0

    @property
    def counted(self) -> int:
        """Bytes this connection has counted and not given back."""
        return sum(self.frames) + self.current + sum(self.messages)

    def _release(self, nbytes: int) -> None:
        if nbytes and self.memory is not None:
            self.memory.release(self.user, nbytes)


__all__ = ["FrameBudget", "UNCOUNTED_BYTES", "COPIES", "RETRY_S", "MAX_RETRY_S"]
