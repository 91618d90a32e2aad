"""Items from other threads to an event loop, in bursts.

The model worker (a thread) answers requests through the loop that owns their sockets. Each
hand-off wakes that loop (asyncio's self-pipe), and a woken loop takes the GIL from the
worker, whose next torch op then waits to get it back. :class:`Handoff` makes items handed
over before the loop gets to them travel together, and lets items that may wait (values and
progress while a forward runs) wait a moment for what comes next. Used by each client
connection at the front (server/app.py ``ConnState``) and by each request inside a model
process (server/ray_replica.py ``ReplicaConn``).
"""
from __future__ import annotations

import asyncio
import threading
import time
from typing import Callable

# What the model worker hands the loop while a forward runs -- a value saved at a site, a
# progress message -- may wait up to HANDOFF_DELAY_S, and up to HANDOFF_BYTES, to travel with
# what comes next. Each wake-up of the loop from the worker costs the worker the GIL: the
# woken loop takes it, and each of the forward's torch ops then waits to get it back. A
# small model's run_with_cache of two sites woke it three times; waking it once made the
# server's execution 23% shorter (tiny-gpt2 1 x 16, paired A/B in one run: 7.6 -> 5.9 ms,
# the whole call 12.8 -> 12.1 ms; bench/README.md).
# Long forwards still stream: the worker hands over what waited at its next site or block
# once the delay is up (``flush_due``), and ``done`` or an error always goes at once. What
# waits stays under HANDOFF_BYTES per connection (an item that would pass it goes at once,
# taking the rest along), and only while that connection's request runs.
HANDOFF_DELAY_S = 0.005
HANDOFF_BYTES = 256 << 10


class Handoff:
    """A burst buffer from other threads to ``loop``: ``deliver(items)`` runs on the loop
    with everything handed over since its last run, in order. ``is_closed()`` true: items
    are dropped (the receiver is gone)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, deliver: Callable[[list], None],
                 is_closed: Callable[[], bool]):
        """Made on ``loop``'s own thread (a connection's handler, a request's stream)."""
        self.loop, self.deliver, self.is_closed = loop, deliver, is_closed
        self._loop_thread = threading.get_ident()
        self._items: list = []
        self._lock = threading.Lock()
        self._scheduled = False
        self._held_since: float | None = None  # the oldest item waiting to travel (may_wait)
        self._held_bytes = 0
        self.wakeups = 0  # wake-ups of the loop to take hand-offs (diagnostics, tests)

    def send(self, item, may_wait: bool = False) -> None:
        """Hand ``item`` over. Items handed over before the loop gets to them travel
        together: one wake-up of the loop, not one per item (a result's header and its
        frame, then ``done``, come in a burst). ``may_wait``: the item may wait for what
        comes next, up to ``HANDOFF_DELAY_S`` and ``HANDOFF_BYTES`` (see there); anything
        else takes what waits along at once."""
        if self.is_closed():
            return
        if threading.get_ident() == self._loop_thread:
            # Sent on the loop itself (a relay): delivered now, after whatever waited.
            with self._lock:
                self._items.append(item)
            self._take()
            return
        with self._lock:
            self._items.append(item)
            if self._scheduled:
                return
            if may_wait:
                now = time.perf_counter()
                if self._held_since is None:
                    self._held_since = now
                self._held_bytes += len(item)
                if now - self._held_since < HANDOFF_DELAY_S and \
                        self._held_bytes < HANDOFF_BYTES:
                    return
            self._scheduled = True
        self._wake_loop()

    def flush_due(self) -> None:
        """Hand over what waited (``may_wait``) once it has waited ``HANDOFF_DELAY_S``: the
        worker calls this at each site and block of a forward, so a long forward's values
        still stream while it runs."""
        held = self._held_since
        if held is None or time.perf_counter() - held < HANDOFF_DELAY_S:
            return
        with self._lock:
            if self._scheduled or not self._items or self.is_closed():
                return
            self._scheduled = True
        self._wake_loop()

    def _wake_loop(self) -> None:
        try:
            self.loop.call_soon_threadsafe(self._take)
        except RuntimeError:  # the loop is closed: nothing will be delivered any more
            with self._lock:
                self._items.clear()
                self._scheduled = False
                self._held_since, self._held_bytes = None, 0
            raise

    def _take(self) -> None:  # on the loop
        with self._lock:
            items, self._items = self._items, []
            self._scheduled = False
            self._held_since, self._held_bytes = None, 0
        self.wakeups += 1
        self.deliver(items)


__all__ = ["Handoff", "HANDOFF_DELAY_S", "HANDOFF_BYTES"]
