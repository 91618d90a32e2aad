"""One Ray Serve replica of a model: it loads the model and runs the same :class:`ModelWorker`
(interleaving executor, batching scheduler) as the embedded engine.

Each request arrives as a plain payload (:mod:`hookwire.server.job_payload`) through a
deployment handle and is answered by an async generator -- Serve streams what it yields back
to the front. What the worker would send to a websocket (protocol JSON and binary tensor
frames) is yielded as it is, in lists of whatever is ready at once (one Ray round trip carries
many small messages). Small dicts from our own code ride along: the replica's id first, and
"keep this upload" notes for the user's store, which lives at the front.

Importing this module does not import Ray; Serve imports it inside the replica process.
"""
from __future__ import annotations

import asyncio
import os

from hookwire.errors import HookwireError
from hookwire.server import replies
from hookwire.server.handoff import Handoff
from hookwire.server.heap import (collect_rarely, freeze_startup_heap, return_freed_memory,
                                  switch_gil_often)
from hookwire.server.prepare import prepare_model
from hookwire.server.relay_session import is_final
from hookwire.server.intake import INLINE_BYTES
from hookwire.server.job_payload import job_from_payload
from hookwire.server.relay_engine import INLINE_TENSOR_BYTES
from hookwire.server.models import load_model
from hookwire.server.worker import ModelWorker
from hookwire.validate import Limits


class KeptValues:
    """The worker keeps values for the user here. The user's store is at the front, so this
    only answers "would it fit" the way the real store does, and notes which uploads to keep
    (saved results are caught by the front from the result frames it relays anyway)."""

    def __init__(self, conn: "ReplicaConn", max_bytes: int):
        self.conn, self.max_bytes = conn, max_bytes
        self.uploads: dict[int, str] = {}  # id(tensor) -> its tid, for the job's uploads

    def keep_upload(self, cid: str, tensor, between=None) -> bool:
        """(The front keeps the upload's bytes as they arrived there: no copy here.)"""
        return self.put(cid, tensor)

    def put(self, rid: str, tensor, cpu_copy=None) -> bool:
        if tensor.numel() * tensor.element_size() > self.max_bytes:
            return False
        tid = self.uploads.get(id(tensor))
        if tid is not None:
            self.conn.send_threadsafe({"keep_upload": tid, "as": rid})
        return True


class ReplicaConn:
    """Stands in for the client's connection inside the replica: what the worker sends goes
    to this request's stream. ``closed`` is set when the front stops listening (cancel,
    disconnect), and the worker stops the request at its next site."""

    def __init__(self, loop: asyncio.AbstractEventLoop, user: str, max_resident_bytes: int):
        self.loop, self.user = loop, user
        self.queue: asyncio.Queue = asyncio.Queue()
        self.closed = False
        self.cancelled: set[str] = set()
        self.store = KeptValues(self, max_resident_bytes)
        # In bursts, as at the front: each wake-up of this process's loop takes the GIL
        # from the worker's forward (server/handoff.py).
        self.handoff = Handoff(loop, self._take, lambda: self.closed)

    def send_threadsafe(self, item, may_wait: bool = False) -> None:
        self.handoff.send(item, may_wait)

    def flush_due(self) -> None:
        self.handoff.flush_due()

    def _take(self, items: list) -> None:  # on the loop
        for item in items:
            self.queue.put_nowait(item)


def _replica_id() -> str:
    try:
        from ray import serve
        return serve.get_replica_context().replica_id.unique_id
    except Exception:  # outside Serve (a unit test constructing the class directly)
        return f"pid{os.getpid()}"


class ModelReplica:
    """The Serve deployment class: ``run`` streams one request's answers; ``info`` tells the
    front what the model offers."""

    def __init__(self, model_spec: str, limits: dict, batching: bool, window_s: float,
                 device_map=None, dtype=None, device=None, replica_id: str | None = None,
                 front_says_alone: bool = False):
        return_freed_memory()  # before the worker's threads start (server/heap.py)
        switch_gil_often()
        hosted = load_model(model_spec, device_map=device_map, dtype=dtype, device=device)
        self.name = hosted.name
        self.entry = prepare_model(hosted)
        self.limits = Limits(**limits)
        self.worker = ModelWorker({self.name: self.entry}, self.limits, batching=batching,
                                  window_s=window_s)
        if front_says_alone:
            # The front tells, per request, whether another connection could still send a
            # batch mate (HookwireServer.mates_possible, when it submitted it): the batch
            # window ends at once when none of the queued requests may get one.
            self.worker.may_join = lambda queued: any(
                getattr(job, "mates_possible", True) for job in queued)
        self.worker.start()
        self.replica = replica_id or _replica_id()
        freeze_startup_heap()  # this process serves until it is stopped (server/heap.py)
        collect_rarely()

    def info(self) -> dict:
        return {"name": self.name, "info_json": self.entry.info_json,
                "replica": self.replica, "pid": os.getpid()}

    def hook_mode_info(self, tl_flags: list) -> str:
        """The ``model_info`` answer with TL's hook switches on (probed here on first use)."""
        try:
            return self.worker.hook_mode_info(self.name, tuple(tl_flags))
        except HookwireError as exc:  # typed, for the client (not a Ray error wrapper)
            return replies.error(None, exc)

    async def run(self, payload: dict):
        conn = ReplicaConn(asyncio.get_running_loop(), payload["user"],
                           self.limits.max_resident_bytes)
        first = [{"replica": self.replica, "pid": os.getpid(), "model": self.name}]
        try:
            # Parsing a large graph takes a while: in a thread, so this loop keeps moving
            # the other requests' answers (the parse is sliced, so the worker runs too). A
            # small one is parsed right here: cheaper than two thread hand-offs.
            if len(payload["submit"]) <= INLINE_BYTES and \
                    sum(len(t["data"]) for t in payload["tensors"]) <= INLINE_TENSOR_BYTES:
                job = job_from_payload(payload, conn)
            else:
                job = await asyncio.get_running_loop().run_in_executor(
                    None, job_from_payload, payload, conn)
            conn.store.uploads = {id(t): tid for tid, t in job.tensors.items()}
            try:
                self.worker.submit(job)
            except HookwireError as exc:  # this replica's queue is full for the user
                yield first + [replies.error(job.request_id, exc)]
                return
            while True:
                items = first + [await conn.queue.get()]
                first = []
                while not conn.queue.empty():
                    items.append(conn.queue.get_nowait())
                yield items
                if any(is_final(item) for item in items):
                    return
        finally:
            # Cancelled or abandoned by the front (or finished): the worker drops the job
            # before it starts, or stops it at its next site.
            conn.closed = True

    def __del__(self):
        worker = getattr(self, "worker", None)
        if worker is not None:
            worker.stop()


__all__ = ["ModelReplica", "ReplicaConn", "KeptValues"]
