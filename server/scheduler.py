"""The queue in front of the model worker: requests wait per user, and batches are formed
round-robin across users, so one user with many queued requests cannot starve the others.

A batch is the first waiting request plus every compatible request (same model and forward
options, within the row and token budget) the rotation reaches, taken one per user per turn.
The worker asks for a batch, the scheduler waits up to ``window_s`` after the first arrival
for batch mates -- only while a mate may still come: the engine's ``may_join`` hook (the
front's view of its connections, ``HookwireServer.mates_possible``) ends the window early
when no connection that could send one is active, so a lone caller's request runs at once.
"""
from __future__ import annotations

import threading
import time
from collections import OrderedDict, deque
from typing import Callable

from hookwire.errors import QueueFull


# Users whose last turn the scheduler remembers (a user forgotten counts as never served:
# the bound only matters for keyless servers, where every connection is a user).
RECALLED_USERS = 4096


class Scheduler:
    """Per-user FIFO queues in a rotation, and the batch former the worker blocks on.

    ``put`` queues a job under its user (``QueueFull`` past ``max_queued_per_user``);
    ``next_batch`` waits for the first job, then up to ``window_s`` for compatible batch
    mates, taking one job per user per turn of the rotation -- the least recently served
    user first -- until ``max_rows`` / ``max_tokens`` or the caller's ``fits`` says stop.
    ``close`` hands back what is still queued, so the worker can answer each with
    ``ServerShuttingDown``.
    """
    MAY_JOIN_POLL_S = 0.05  # how often a long window asks may_join again without an arrival

    def __init__(self, max_queued_per_user: int, window_s: float, max_rows: int,
                 max_tokens: int):
        self.max_queued = max_queued_per_user
        self.window_s, self.max_rows, self.max_tokens = window_s, max_rows, max_tokens
        self._cond = threading.Condition()
        self._queues: OrderedDict[str, deque] = OrderedDict()  # user -> jobs, rotation order
        # user -> when a batch serving it last finished (``finished``: the least recently
        # served user goes first, see _take); at most RECALLED_USERS users
        self._last_served: OrderedDict[str, int] = OrderedDict()
        self._finished = 0
        self._closed = False

    def put(self, job, user: str) -> int:
        """Queue a job; returns its position (requests ahead of it, plus one)."""
        with self._cond:
            q = self._queues.setdefault(user, deque())
            if len(q) >= self.max_queued:
                raise QueueFull(f"{len(q)} requests already queued for this user; limit "
                                f"{self.max_queued}", rule="max_queued_per_user")
            q.append(job)
            self._cond.notify()
            return self._size()

    def put_back(self, jobs: list, user_of: Callable) -> list:
        """Return jobs taken from their users' queues to the head of them, in their order
        (a request taken to run in another's place that proved long: ModelWorker); no
        capacity check -- they were counted when they came. Returns them instead once
        closed (the caller answers them)."""
        with self._cond:
            if self._closed:
                return list(jobs)
            for job in reversed(jobs):
                self._queues.setdefault(user_of(job), deque()).appendleft(job)
            if jobs:
                self._cond.notify()
            return []

    def _size(self) -> int:
        return sum(len(q) for q in self._queues.values())

    def _queued(self) -> list:
        return [job for q in self._queues.values() for job in q]

    def qsize(self) -> int:
        with self._cond:
            return self._size()

    def wait_for_work(self, timeout: float) -> bool:
        """Wait up to ``timeout`` for a job (or the close); whether one came."""
        with self._cond:
            return self._cond.wait_for(lambda: self._size() or self._closed, timeout)

    def close(self) -> list:
        """Stop handing out batches; returns every job still queued."""
        with self._cond:
            self._closed = True
            left = [job for q in self._queues.values() for job in q]
            self._queues.clear()
            self._cond.notify_all()
            return left

    def next_batch(self, key: Callable, rows: Callable, tokens: Callable,
                   fits: Callable | None = None,
                   may_join: Callable[[list], bool] | None = None) -> list | None:
        """Block until a batch is ready (None once closed). ``key(job)`` says which jobs may
        share a forward (None: this one runs alone); ``rows``/``tokens`` size a job;
        ``fits(jobs)`` may refuse a batch as a whole (e.g. what right-padding makes of it).
        ``may_join(queued_jobs)``: whether a request not queued yet could still join; once
        it says no, the window ends (None: always wait the whole window)."""
        with self._cond:
            while not self._size() and not self._closed:
                self._cond.wait()
            if self._closed:
                return None
            deadline = time.monotonic() + self.window_s
            while not self._closed and self._size() < self.max_rows:
                if may_join is not None and not may_join(self._queued()):
                    break  # nobody could still send a batch mate: no reason to wait
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                # Woken by each arrival; and now and then, as what may_join sees changes
                # without one (a connection falls silent).
                self._cond.wait(min(remaining, self.MAY_JOIN_POLL_S) if may_join else remaining)
            if self._closed:
                return None
            return self._take(key, rows, tokens, fits)

    def take_now(self, accept: Callable, key: Callable, rows: Callable, tokens: Callable,
                 fits: Callable | None = None) -> list:
        """A batch of queued jobs ``accept(job)`` admits, formed as ``next_batch`` forms one
        (only the head of each user's queue is considered, so each user's requests keep
        their order); [] at once if no user's next job is admitted. Never waits."""
        with self._cond:
            if self._closed or not any(q and accept(q[0]) for q in self._queues.values()):
                return []
            return self._take(key, rows, tokens, fits, accept)

    def _take(self, key, rows, tokens, fits=None, accept=None) -> list:
        accept = accept or (lambda job: True)
        # Least recently served first -- by when its last batch *finished* (never served:
        # first of all; ties: rotation order). Rotation order alone put a user whose queue had
        # just emptied behind one served a moment ago, and the start of a batch is no better:
        # a victim served inside a co-tenant's long forward (server/give_way.py) would count
        # as served after it. Either way a victim whose request arrived during a co-tenant's
        # long forward waited for the co-tenant's *next* one to start too (bench_fairness.py
        # unread: ~90 ms).
        users = sorted((u for u, q in self._queues.items() if q and accept(q[0])),
                       key=lambda u: self._last_served.get(u, -1))
        first = self._queues[users[0]].popleft()
        batch, batch_key = [first], key(first)
        n_rows, n_tok = rows(first), tokens(first)
        served = [users[0]]
        if batch_key is not None:
            progress = True
            while progress:
                progress = False
                for user in users[1:] + users[:1]:
                    q = self._queues[user]
                    if not q or not accept(q[0]) or key(q[0]) != batch_key:
                        continue
                    job = q[0]
                    r, t = rows(job), tokens(job)
                    if n_rows + r > self.max_rows or n_tok + t > self.max_tokens or \
                            (fits is not None and not fits(batch + [job])):
                        continue
                    batch.append(q.popleft())
                    n_rows, n_tok = n_rows + r, n_tok + t
                    served.append(user)
                    progress = True
        # Rotate: users served go to the back, so the next batch starts with someone else.
        for user in dict.fromkeys(served):
            q = self._queues.pop(user)
            if q:
                self._queues[user] = q
        return batch

    def finished(self, users) -> None:
        """A batch of these users' jobs finished (the worker says so, for nested batches
        too): they are now the most recently served."""
        with self._cond:
            self._finished += 1
            for user in users:
                self._last_served.pop(user, None)
                self._last_served[user] = self._finished
            while len(self._last_served) > RECALLED_USERS:  # forget the least recent
                self._last_served.popitem(last=False)


__all__ = ["Scheduler"]
