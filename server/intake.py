"""Work the front does per message, off its event loop.

Everything whose cost grows with a client's message -- parsing a control message, checking
a submit's declared tensors and references, reserving its memory, allocating its buffers --
runs here, in background threads, never on the event loop that serves every connection.
The loop only hands the message over and, when the result comes back, does O(1) work with
it. Each connection has at most one message here at a time (its reader awaits the result),
so messages keep their order and TCP backpressure holds a fast sender back.

A message of at most ``INLINE_BYTES`` (4 KiB: a typical submit) is parsed on the loop
itself (:func:`parsed_inline`): its cost is bounded below the interpreter's switch interval,
so handing it to a thread would keep the loop waiting for the GIL as long, and the hand-off
there and back is a tenth of a small model's call.

Two lanes, so a small message (a victim's next request: a few KB) never waits behind a
large one: messages up to ``SMALL_BYTES`` (64 KiB) go to one thread, larger ones to another.
Each lane serves users round-robin, and both give way while a batch runs: their work, though
off the loop, shares the interpreter with the model worker, and a thread parsing holds the
GIL each time one of the forward's torch ops wants it back (a 10 MB graph parsed beside a
10 ms forward made it take over a second). So a parse calls ``pause`` every few hundred
objects (:func:`~hookwire.protocol.parse_client_message_bounded`; a small request has fewer
and never pauses), and while a batch runs it waits there ``BUSY_PAUSE_FACTOR`` times as long
as it just computed (or until the batch ends): it takes at most a fifth of the interpreter
from a running batch, and a large message still gets parsed on a server that is never idle.
The large lane also rests after each message while a batch runs.
"""
from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
from collections import OrderedDict, deque
from typing import Callable

log = logging.getLogger("hookwire.server")

SMALL_BYTES = 64 << 10
# Messages up to this size are parsed on the loop itself: a sweep's submit is 1-4 KB, and
# the two thread hand-offs to a lane and back cost it about 0.5 ms (bench_overhead, 7% of a
# small model's call). Bounded: the worst 4 KiB message (a few thousand bad graph nodes
# that each fail validation) parses in ~3 ms -- below the interpreter's 5 ms switch
# interval, so a lane's thread would hold the GIL, and keep the loop waiting, just as long;
# and the user's FrontShare is charged for it all the same.
INLINE_BYTES = 4 << 10
BUSY_PAUSE_FACTOR = 4  # while a batch runs, the large lane waits 4x what it computed


class _Lane(threading.Thread):
    """One thread running tasks round-robin across users."""

    def __init__(self, name: str, busy: threading.Event | None, rest_after_task: bool):
        super().__init__(name=name, daemon=True)
        self.busy = busy
        self.rest_after_task = rest_after_task
        self._computing_since = time.perf_counter()
        self._cond = threading.Condition()
        self._queues: OrderedDict[str, deque] = OrderedDict()
        self._closed = False

    def put(self, user: str, task) -> None:
        with self._cond:
            self._queues.setdefault(user, deque()).append(task)
            self._cond.notify()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def _next(self):
        with self._cond:
            while not self._queues and not self._closed:
                self._cond.wait()
            if self._closed:
                return None
            user, queue = next(iter(self._queues.items()))
            task = queue.popleft()
            del self._queues[user]
            if queue:  # this user goes to the back of the rotation
                self._queues[user] = queue
            return task

    def pause(self) -> None:
        """Called (on this lane's thread) between short pieces of a task: while a batch runs,
        wait ``BUSY_PAUSE_FACTOR`` times as long as the piece took, or until the batch ends."""
        now = time.perf_counter()
        if self.busy is not None and self.busy.is_set():
            until = now + BUSY_PAUSE_FACTOR * (now - self._computing_since)
            while self.busy.is_set() and now < until:
                time.sleep(min(0.002, until - now))
                now = time.perf_counter()
        self._computing_since = now

    def run(self) -> None:
        while True:
            task = self._next()
            if task is None:
                return
            loop, future, fn, args, cost = task
            t0 = self._computing_since = time.perf_counter()
            cpu = time.thread_time()
            try:
                result, error = fn(*args, pause=self.pause), None
            except BaseException as exc:  # handed to the awaiting connection
                result, error = None, exc
            cost[0] = time.thread_time() - cpu  # its CPU time: not its pauses, not GIL waits
            try:
                loop.call_soon_threadsafe(_settle, future, result, error)
            except RuntimeError:  # the loop is gone (server stopping)
                return
            del task, future, result, error
            if self.rest_after_task and self.busy is not None and self.busy.is_set():
                # Large messages give way to a running batch: at most half the time.
                time.sleep(min(time.perf_counter() - t0, 0.25))


def _settle(future: asyncio.Future, result, error) -> None:
    if future.cancelled():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


class Intake:
    """The front's two background lanes (small and large messages) for work that grows with
    a message; both give way while the worker's ``busy`` event is set. ``run`` hands
    one message's work to the right lane and awaits its result on the event loop."""
    def __init__(self, busy: threading.Event | None = None):
        self.small = _Lane("hookwire-intake-small", busy, rest_after_task=False)
        self.large = _Lane("hookwire-intake-large", busy, rest_after_task=True)
        self.small.start()
        self.large.start()

    async def run(self, user: str, size: int, fn: Callable, *args, cost: list | None = None):
        """``fn(*args, pause=...)`` in the lane for a message of ``size`` bytes; its result
        (or its exception) once done. ``fn`` calls ``pause()`` now and then (or ignores it:
        None in the small lane). ``cost[0]`` is set to the seconds it took there."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        (self.small if size <= SMALL_BYTES else self.large).put(
            user, (loop, future, fn, args, cost if cost is not None else [0.0]))
        try:
            return await future
        finally:
            # The future holds the exception, whose traceback holds this frame: without
            # this, a refused message (its text too) would wait for the cycle collector.
            del future

    def close(self) -> None:
        self.small.close()
        self.large.close()


def parsed_inline(session, message: str | bytes):
    """``session.admit(message)`` right here when the message is at most ``INLINE_BYTES``;
    None (nothing done) for a longer one, which goes to a lane."""
    if len(message) > INLINE_BYTES:
        return None
    return session.admit(message)


class FrontShare:
    """Each user's share of the front's time. Every message a user sends costs the front
    time (reading its bytes, parsing, admitting, answering -- a refused message too); each
    user may spend ``share`` of a second per second, with a burst of as much. A user over
    its share has its connections' next reads wait until it is back in credit, so a tenant
    flooding the server with messages (refused or not) is slowed by TCP backpressure, not
    everyone else. What the loop does for a message outside the handler's own timing is
    charged too: receiving it (websockets reads, unmasks and assembles it: an estimate per
    message and per byte) and sending each answer (``charge_sent``).

    The share is enforced only while the front is shared -- another user was charged within
    ``SHARED_WITHIN_S`` -- so a user alone on the server (a sweep streaming large results)
    is never slowed by a rule that protects others; its debt is forgiven meanwhile.
    ``waited_s`` records how long each user's reads waited."""

    # What receiving a message costs the loop beyond what the handler times (websockets:
    # reading, unmasking, assembling, handing over; a text message is UTF-8 decoded too):
    # per message and per byte. Per message: ~100 us measured on the 2-core CI machine
    # (bench_fairness, view_bomb, py-spy: websockets' data_received and __aiter__ samples
    # over messages received); half of it is charged, so a faster machine is not overcharged.
    MESSAGE_S = 50e-6
    BYTES_PER_S = {bytes: 1e9, str: 250e6}
    # An answer up to this size is charged the loop thread's CPU time its send took (it never
    # waits for the socket unless its client stops reading); a larger one by its size.
    MEASURED_SEND_BYTES = 64 << 10
    SHARED_WITHIN_S = 1.0

    def __init__(self, share: float):
        self.share = share
        self._credit: dict[str, tuple[float, float]] = {}  # user -> (credit s, as of)
        # The last two distinct users charged, newest first: (user, when).
        self._recent = [("", -math.inf), ("", -math.inf)]
        self.waited_s: dict[str, float] = {}
        self.received_s: dict[str, float] = {}  # loop time taking in each user's bytes

    def _now_credit(self, user: str) -> float:
        credit, since = self._credit.get(user, (self.share, 0.0))
        return min(self.share, credit + (time.monotonic() - since) * self.share)

    def _debit(self, user: str, seconds: float) -> None:
        now = time.monotonic()
        self._credit[user] = (self._now_credit(user) - seconds, now)
        if self._recent[0][0] == user:
            self._recent[0] = (user, now)
        else:
            self._recent = [(user, now), self._recent[0]]

    def charge(self, user: str, seconds: float, message=b"") -> None:
        """``seconds`` measured for ``message``, plus what receiving it cost the loop."""
        self._debit(user, seconds + self.MESSAGE_S +
                    len(message) / self.BYTES_PER_S[type(message)])

    def charge_sent(self, user: str, cpu_seconds: float, answer) -> None:
        """An answer was sent to ``user``: ``cpu_seconds`` of the loop thread's CPU time the
        send took, for a small answer; a larger one (it may have waited for its socket while
        others ran) by its size."""
        if len(answer) > self.MEASURED_SEND_BYTES:
            cpu_seconds = len(answer) / self.BYTES_PER_S[bytes]
        self._debit(user, cpu_seconds)

    def shared(self, user: str) -> bool:
        """Another user was charged within ``SHARED_WITHIN_S``."""
        other = self._recent[0] if self._recent[0][0] != user else self._recent[1]
        return time.monotonic() - other[1] <= self.SHARED_WITHIN_S

    def charge_receiving(self, user: str, cpu_seconds: float) -> None:
        """The loop thread's CPU time spent taking in ``user``'s bytes: parsing its frames
        and answering its pings (``server/frame_budget.py``, measured around websockets'
        ``data_received``). Pings and pongs never become messages, and a message may come
        in many fragments, so this is charged besides each message's estimate above."""
        self._debit(user, cpu_seconds)
        self.received_s[user] = self.received_s.get(user, 0.0) + cpu_seconds

    def wait_needed(self, user: str) -> float:
        """Seconds ``user``'s reads must wait to be back in credit (0: none). Asking records
        nothing: whoever then waits says how long (``waiting``)."""
        credit = self._now_credit(user)
        if credit >= 0:
            return 0.0
        if not self.shared(user):
            self._credit[user] = (0.0, time.monotonic())  # alone: nothing to make up for
            return 0.0
        return -credit / self.share

    def waiting(self, user: str, seconds: float) -> None:
        """``user``'s reads are made to wait ``seconds`` (counted in ``waited_s``)."""
        self.waited_s[user] = self.waited_s.get(user, 0.0) + seconds

    async def wait_turn(self, user: str) -> None:
        wait = self.wait_needed(user)
        if wait > 0:
            self.waiting(user, wait)
            await asyncio.sleep(wait)

    def forget(self, user: str) -> None:
        self._credit.pop(user, None)
        self.waited_s.pop(user, None)
        self.received_s.pop(user, None)


__all__ = ["Intake", "FrontShare", "SMALL_BYTES"]
