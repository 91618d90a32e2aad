"""The relay half of an engine whose models run in other processes (replicas): the front
hands each accepted request to a replica as a plain payload (server/job_payload.py) and
relays what the replica streams back to the client's connection.

:class:`RelayEngine` offers the front what :class:`~hookwire.server.worker.ModelWorker`
offers (``entries``, ``submit``, ``queue_depth``, ``cancel``, ``describe``,
``start``/``stop``/``join``), so ``HookwireServer`` does not know which engine runs its
requests. A subclass says how a request reaches a replica (``_open_stream``: an async
iterator of item lists with a ``cancel()``), which errors mean the replica was lost
(``RETRYABLE``), and how replicas stop (``_teardown``): the Ray engine
(server/ray_engine.py) and the process engine (server/process_engine.py).

Every accepted request still ends in exactly one ``done`` or ``error``: if the replica dies
before any result of the request was relayed, the request is sent again; after that, the
client gets a typed ``replica_lost`` error and may retry. A replica killed for lack of memory
(``OUT_OF_MEMORY``) counts the same, but such a request is sent again once only: it may
itself be what exhausted the memory.
"""
from __future__ import annotations

import asyncio
import logging
import threading
from collections import Counter

from hookwire.errors import (Cancelled, ExecutionError, HookwireError, QueueFull, ReplicaLost,
                             ServerShuttingDown, UnknownModel)
from hookwire.server import replies
from hookwire.server.relay_session import RelaySession
from hookwire.server.intake import INLINE_BYTES
from hookwire.server.job_payload import job_to_payload
from hookwire.server.worker import Job
from hookwire.validate import Limits

log = logging.getLogger("hookwire.server.relay")

MAX_ATTEMPTS = 4          # one request, sent again after a replica died before answering
MAX_OOM_RETRIES = 1       # ... but after an out-of-memory kill only once (it may be the cause)
RETRY_PAUSE_S = 0.5       # ... a moment for the replica to be replaced (or routed around)
INLINE_TENSOR_BYTES = 64 << 10  # a payload this small is built on the loop (``_small``)




def _retrieve(future) -> None:
    """Read the outcome of an abandoned stream read (a cancellation error once we cancelled
    its stream), so asyncio does not report it as never retrieved."""
    if not future.cancelled():
        future.exception()


def _small(job: Job) -> bool:
    """Whether building the job's payload is bounded small work: a submit of at most
    ``INLINE_BYTES`` (as the front parses on its loop) and at most ``INLINE_TENSOR_BYTES``
    of tensors and referenced residents."""
    text = job.submit_text
    if text is None or len(text) > INLINE_BYTES:
        return False
    nbytes = sum(t.numel() * t.element_size() for t in job.tensors.values())
    nbytes += sum(base.numel() * base.element_size() for _, base, _ in job.refs)
    return nbytes <= INLINE_TENSOR_BYTES


class RelayEngine:
    """What the front calls of an engine whose replicas run elsewhere; see the module
    docstring. Subclasses set ``entries`` (model name -> an object with ``info_json``),
    ``RETRYABLE``/``OUT_OF_MEMORY`` and implement ``_open_stream``, ``describe``,
    ``hook_mode_info`` and ``_teardown``, then call ``_init_relay``.
    ``Limits.max_queued_per_user`` is enforced here, at the front, by counting each user's
    requests in flight (``QueueFull``)."""

    RETRYABLE: tuple = ()
    OUT_OF_MEMORY: tuple = ()
    relays_jobs = True  # the front keeps each submit's text for the payload (job_payload.py)
    OUT_OF_MEMORY_WHY = "the replica ran out of memory"
    max_attempts = MAX_ATTEMPTS  # sends of one request while replicas die under it

    def _init_relay(self, limits: Limits | None, batching: bool) -> None:
        self.limits = limits or Limits()
        self.batching = batching
        self.entries: dict = {}
        self.served_by: Counter = Counter()   # replica id -> requests it answered
        self.replica_pids: dict[str, int] = {}  # replica id -> its process (not on /health)
        self.replica_models: dict[str, str] = {}  # replica id -> the model it holds
        self.retried = 0
        self._tasks: dict = {}
        self._per_user: Counter = Counter()
        self._closing = False
        self._alive = False
        self._torn_down = False
        self._idle = threading.Event()
        self._idle.set()

    async def _open_stream(self, model: str, payload: dict):
        raise NotImplementedError

    def _payload_of(self, job: Job) -> dict:
        """The job as plain data (in a thread of the front's executor)."""
        return job_to_payload(job)

    def _teardown(self) -> None:
        raise NotImplementedError

    # ---- what the front calls -------------------------------------------------------------
    def start(self) -> None:
        self._alive = True

    def is_alive(self) -> bool:
        return self._alive

    def queue_depth(self) -> int:
        return len(self._tasks)

    def submit(self, job: Job) -> int:
        """Called on the front's event loop for an accepted request."""
        if self._closing:
            raise ServerShuttingDown("the server is shutting down; retry when it is back")
        user = job.conn.user
        if self._per_user[user] >= self.limits.max_queued_per_user:
            raise QueueFull(f"{self._per_user[user]} requests already waiting for this user; "
                            f"limit {self.limits.max_queued_per_user}",
                            rule="max_queued_per_user")
        self._per_user[user] += 1
        key = (id(job.conn), job.request_id)
        stop = asyncio.Event()
        task = asyncio.get_running_loop().create_task(self._relay(job, key, stop))
        self._tasks[key] = (task, stop)
        self._idle.clear()
        return len(self._tasks)

    def cancel(self, conn, request_id: str | None = None) -> None:
        """A client's cancel (or, with no id, its connection closing): stop relaying, which
        makes the replica drop or stop the request."""
        for (cid, rid), (_, stop) in list(self._tasks.items()):
            if cid == id(conn) and (request_id is None or rid == request_id):
                stop.set()

    def stop(self) -> None:
        """Refuse new requests; those in flight finish (``join`` waits for them)."""
        self._closing = True

    def join(self, timeout: float | None = None) -> None:
        self._idle.wait(timeout)
        self.close()

    def close(self) -> None:
        """Stop the replicas now (the subclass's ``_teardown``), once."""
        self._closing = True
        if self._alive or not self._torn_down:
            self._alive = False
            self._torn_down = True
            self._teardown()

    # ---- one request ----------------------------------------------------------------------
    async def _relay(self, job: Job, key, stop: asyncio.Event) -> None:
        conn, rid = job.conn, job.request_id
        try:
            model = job.submit.graph.model
            if model not in self.entries:
                raise UnknownModel(f"model {model!r} is not served here; "
                                   f"served: {', '.join(self.entries)}")
            if rid in conn.cancelled:  # the client's cancel may overtake its own submit
                raise Cancelled(f"request {rid} was cancelled before it started")
            # Copying tensors (and views no larger than their resident) into the payload
            # grows with the request: done in a thread, not on the front's event loop --
            # unless the request is small (bounded work, cheaper than two thread hand-offs).
            if _small(job):
                payload = self._payload_of(job)
            else:
                payload = await asyncio.get_running_loop().run_in_executor(
                    None, self._payload_of, job)
            out_of_memory = 0
            for attempt in range(1, self.max_attempts + 1):
                answer = RelaySession(conn.store, job.tensors)
                try:
                    stream = await self._open_stream(model, payload)
                    finished = await self._pump(stream, job, answer, stop)
                    if finished and not answer.finished:  # a bug of ours over there
                        raise ExecutionError(f"request {rid} ended without an answer from "
                                             "the model's replica; retry it")
                except self.RETRYABLE as exc:
                    oom = isinstance(exc, self.OUT_OF_MEMORY)
                    out_of_memory += oom
                    why = (self.OUT_OF_MEMORY_WHY if oom else type(exc).__name__)
                    if answer.relayed or attempt == self.max_attempts or \
                            out_of_memory > MAX_OOM_RETRIES:
                        raise ReplicaLost(
                            f"the replica running request {rid} stopped ({why}) after part "
                            "of its answer was sent; retry the request" if answer.relayed else
                            f"request {rid} was not answered: {attempt} replica(s) stopped "
                            f"while running it ({why}); retry later",
                            cause="out_of_memory" if oom else "replica_died") from None
                    self.retried += 1
                    log.warning("replica lost while running %s (%s); sending it again", rid,
                                why)
                    del exc
                    await asyncio.sleep(RETRY_PAUSE_S * attempt)
                    continue
                if not finished and rid in conn.cancelled and not conn.closed:
                    conn.send_threadsafe(replies.error(rid, Cancelled(
                        f"request {rid} was cancelled")))
                return
        except Exception as exc:
            # A typed error is the request's own answer (its client hears it): logging it
            # would let a tenant write the operator's log, a traceback a request, on the
            # loop. Only what is not ours to expect -- a bug -- is logged.
            if not isinstance(exc, HookwireError):
                log.exception("request %s failed in the %s engine", rid, type(self).__name__)
            conn.send_threadsafe(replies.error(rid, exc))
        finally:
            job.finish()  # its memory reservation (server/memory.py)
            self._tasks.pop(key, None)
            self._per_user[conn.user] -= 1
            if self._per_user[conn.user] <= 0:
                del self._per_user[conn.user]
            if not self._tasks:
                self._idle.set()

    async def _pump(self, stream, job: Job, answer: RelaySession,
                    stop: asyncio.Event) -> bool:
        """Relay the replica's stream to the client until it ends (True) or ``stop`` is set
        by a cancel or disconnect (False: the stream is cancelled, so the replica drops or
        stops the request). What each item means is ``answer``'s to say; this only moves
        them."""
        conn = job.conn
        items_iter = stream.__aiter__()
        stopped = asyncio.ensure_future(stop.wait())
        try:
            while True:
                following = asyncio.ensure_future(items_iter.__anext__())
                await asyncio.wait((following, stopped), return_when=asyncio.FIRST_COMPLETED)
                if not following.done():
                    following.cancel()
                    following.add_done_callback(_retrieve)
                    stream.cancel()
                    return False
                try:
                    items = following.result()
                except StopAsyncIteration:
                    return True
                for item in items:
                    forward = answer.receive(item)
                    if forward is not None:
                        conn.send_threadsafe(forward)
                self._count(answer)
                if answer.finished:
                    # The request's done/error is out: its answer is complete. Not waiting
                    # for the stream's end saves a round trip, and a replica dying after
                    # this point can no longer add a second ending.
                    return True
                if conn.closed:
                    stream.cancel()
                    return False
        finally:
            stopped.cancel()

    def _count(self, answer: RelaySession) -> None:
        """Which replica answered (``describe``, tests), once per answer."""
        note, answer.replica = answer.replica, None
        if note is not None:
            self.served_by[note["replica"]] += 1
            self.replica_pids[note["replica"]] = note["pid"]
            self.replica_models[note["replica"]] = note["model"]



__all__ = ["RelayEngine", "MAX_ATTEMPTS", "MAX_OOM_RETRIES", "RETRY_PAUSE_S"]
