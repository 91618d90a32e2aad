"""Memory that requests hold before and after they run, counted per user and server-wide.

What a request makes the server hold while it is not running: its parsed message (a large
one: counted from its JSON's arrays and objects before it is parsed -- a maximal graph holds
over 120 MiB of Python objects; ``server/session.py``), its uploaded tensors (from the
moment the submit declares them), the tensors it refers to on the server once materialised
(a strided view of a resident value counts every element it will have, so a stride-0 view of
4 bytes counts as what it expands to), and its results queued for a client that has not read
them yet. Each is *reserved* before a byte is allocated -- a submit that would take the user
or the whole server over its budget is refused with ``LimitExceeded`` naming the rule -- and
released when the request ends (done, error, dropped, timed out, or its connection closed).
Results are counted when the model makes them (they cannot be refused mid-request), so a
user whose results pile up unread has new submits refused.

Per user alone bounds nothing without API keys, where every connection is its own user: the
server-wide budget does.
"""
from __future__ import annotations

import threading
from collections import Counter

from hookwire.errors import LimitExceeded


class MemoryBudget:
    """Bytes held by queued requests and unread results, per user (``per_user``) and for the
    whole server (``total``). ``reserve`` refuses with ``LimitExceeded`` (rule
    ``max_pending_bytes_per_user`` / ``max_pending_bytes_total``) before anything is
    allocated; ``force`` counts what cannot be refused (results the model already made);
    a :class:`Reservation` gives its bytes back when its request ends."""
    def __init__(self, per_user: int, total: int):
        self.per_user, self.total = per_user, total
        self._lock = threading.Lock()
        self._held: Counter = Counter()
        self.pending_total = 0

    def pending_of(self, user: str) -> int:
        with self._lock:
            return self._held[user]

    def reserve(self, user: str, nbytes: int, what: str = "this request",
                server_wide: bool = True) -> "Reservation":
        """Count ``nbytes`` for ``user``, or raise ``LimitExceeded`` (nothing counted).
        ``server_wide=False``: checked against the user's own share only, like a running
        request's results (other users' unread results must not fail it midway)."""
        with self._lock:
            held = self._held[user]
            if held + nbytes > self.per_user:
                raise LimitExceeded(
                    f"{what} needs {nbytes} bytes; this user already holds {held} bytes of "
                    f"requests and unread results (limit {self.per_user}): wait for them, "
                    "or read them", rule="max_pending_bytes_per_user")
            if server_wide and self.pending_total + nbytes > self.total:
                raise LimitExceeded(
                    f"{what} needs {nbytes} bytes; the server already holds "
                    f"{self.pending_total} bytes of requests and unread results (limit "
                    f"{self.total}): retry later", rule="max_pending_bytes_total")
            self._add(user, nbytes)
        return Reservation(self, user, nbytes)

    def force(self, user: str, nbytes: int) -> None:
        """Count bytes that already exist (results the model made): never refused."""
        with self._lock:
            self._add(user, nbytes)

    def release(self, user: str, nbytes: int) -> None:
        with self._lock:
            self._add(user, -nbytes)

    def _add(self, user: str, nbytes: int) -> None:
        self._held[user] += nbytes
        self.pending_total += nbytes
        if self._held[user] <= 0:
            del self._held[user]


class Reservation:
    """Bytes one request holds; ``release`` is idempotent (every way a request can end
    calls it)."""

    def __init__(self, budget: MemoryBudget | None, user: str, nbytes: int):
        self.budget, self.user, self.nbytes = budget, user, nbytes

    def grow(self, nbytes: int, what: str, server_wide: bool = True) -> None:
        """Reserve more for the same request (refused like a new reservation; with
        ``server_wide=False``, only by the user's own share)."""
        if self.budget is not None and nbytes:
            self.budget.reserve(self.user, nbytes, what, server_wide)
            self.nbytes += nbytes

    def shrink(self, nbytes: int) -> None:
        """Give back up to ``nbytes`` of what this request holds, before it ends."""
        n = min(nbytes, self.nbytes)
        if self.budget is not None and n > 0:
            self.budget.release(self.user, n)
            self.nbytes -= n

    def absorb(self, other: "Reservation") -> None:
        """Take over ``other``'s bytes (same user and budget): released with this one."""
        if other.budget is not None:
            assert other.budget is self.budget and other.user == self.user
            self.nbytes += other.nbytes
            other.budget = None

    def release(self) -> None:
        budget, self.budget = self.budget, None
        if budget is not None:
            budget.release(self.user, self.nbytes)


NO_RESERVATION = Reservation(None, "", 0)

__all__ = ["MemoryBudget", "Reservation", "NO_RESERVATION"]
