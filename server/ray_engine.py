"""The Ray engine: the websocket front hands each accepted request to a Ray Serve deployment
of its model and relays what the replica streams back.

It offers the front what :class:`~hookwire.server.worker.ModelWorker` offers (``entries``,
``submit``, ``queue_depth``, ``cancel``, ``describe``, ``start``/``stop``/``join``), so
``HookwireServer`` does not know which engine runs its requests. Each request is one
streaming call through the model's deployment handle; the replica runs the same
``ModelWorker`` (executor + batching) as the embedded engine.

Every accepted request still ends in exactly one ``done`` or ``error``: if the replica dies
before any result of the request was relayed, the request is sent again (Serve routes it to a
live replica); after that, the client gets a typed ``replica_lost`` error and may retry. A
replica that Ray's memory monitor killed counts the same (``OutOfMemoryError`` is typed as
``replica_lost`` with ``details["cause"] == "out_of_memory"``), but such a request is sent again
once only: it may itself be what exhausted the memory.
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
from collections import Counter
from dataclasses import dataclass

from hookwire.errors import Cancelled, QueueFull, ReplicaLost, ServerShuttingDown, UnknownModel
from hookwire.server import ray_cluster, replies
from hookwire.server.job_payload import job_to_payload
from hookwire.server.relay_session import RelaySession
from hookwire.server.residents import materialize_refs
from hookwire.server.worker import BATCH_WINDOW_S, Job
from hookwire.validate import Limits

log = logging.getLogger("hookwire.server.ray")

MAX_ATTEMPTS = 4          # one request, sent again after a replica died before answering
MAX_OOM_RETRIES = 1       # ... but after an out-of-memory kill only once (it may be the cause)
RETRY_PAUSE_S = 0.5       # ... Serve needs a moment to stop routing to the dead replica


@dataclass
class RemoteEntry:
    """What the front needs of a model served by replicas: its ``model_info`` answer."""
    info_json: str


def _payload_of(job: Job) -> dict:
    if job.refs:
        job.tensors = {**job.tensors, **materialize_refs(job.refs)}
        job.refs = []
    return job_to_payload(job)


def _retrieve(future) -> None:
    """Read the outcome of an abandoned stream read (a RequestCancelledError once we cancelled
    its stream), so asyncio does not report it as never retrieved."""
    if not future.cancelled():
        future.exception()


class RayEngine:
    """The Ray Serve engine: the same seam as :class:`~hookwire.server.worker.ModelWorker`
    (``entries``, ``submit``, ``queue_depth``, ``cancel``, ``describe``, ``hook_mode_info``,
    ``start``/``stop``/``join``), with the models in Serve replicas instead of a thread.

    At construction it connects to Ray (or starts a private local one:
    :mod:`hookwire.server.ray_cluster`), deploys one Serve application per model with
    ``replicas`` replicas (an int, or ``{model: n}``; CPUs/GPUs per replica, ``device_map``,
    ``dtype`` and ``device`` go to each replica, which loads the model itself) and reads each
    model's manifest from a replica (``entries``: the front validates nothing model-side
    itself). ``submit`` turns a job into a plain payload (:mod:`hookwire.server.job_payload`)
    and starts a relay task on the front's loop: one streaming call through the deployment
    handle, whose items (protocol JSON, tensor frames, "keep this upload" notes) go to the
    connection as they come. A replica lost before anything was relayed means the request
    is sent again (once only if Ray's memory monitor killed it); after a partial answer the
    client gets ``ReplicaLost``. ``Limits.max_queued_per_user`` is enforced here, at the
    front, by counting each user's requests in flight (``QueueFull``).
    """
    def __init__(self, models: list[str], replicas: int | dict = 1, limits: Limits | None = None,
                 batching: bool = True, window_s: float = BATCH_WINDOW_S,
                 address: str | None = None, num_cpus_per_replica: float = 1,
                 num_gpus_per_replica: float = 0, device_map=None,
                 ray_num_cpus: int | None = None, dtype=None, device=None,
                 replica_class=None):
        self.limits = limits or Limits()
        self.batching = batching
        self.replicas = replicas
        self.owns_ray = ray_cluster.connect(address, num_cpus=ray_num_cpus)
        self.specs = list(models)
        self.handles: dict = {}
        self.plain_handles: dict = {}
        self.entries: dict[str, RemoteEntry] = {}
        try:
            for spec in self.specs:
                count = replicas.get(spec, 1) if isinstance(replicas, dict) else replicas
                handle = ray_cluster.deploy(
                    spec, replicas=count, limits=dataclasses.asdict(self.limits),
                    batching=batching, window_s=window_s, num_cpus=num_cpus_per_replica,
                    num_gpus=num_gpus_per_replica, device_map=device_map, dtype=dtype,
                    device=device, replica_class=replica_class)
                info = handle.info.remote().result()
                self.handles[info["name"]] = handle.options(stream=True)  # generator calls
                self.plain_handles[info["name"]] = handle
                self.entries[info["name"]] = RemoteEntry(info["info_json"])
        except BaseException:
            self._teardown()
            raise
        self.served_by: Counter = Counter()   # replica id -> requests it answered
        self.replica_pids: dict[str, int] = {}  # replica id -> its process (not on /health)
        self.replica_models: dict[str, str] = {}  # replica id -> the model it holds
        self.retried = 0
        self._tasks: dict[tuple[int, str], asyncio.Task] = {}
        self._per_user: Counter = Counter()
        self._closing = False
        self._alive = False
        self._idle = threading.Event()
        self._idle.set()

    # ---- what the front calls -------------------------------------------------------------
    def start(self) -> None:
        self._alive = True

    def is_alive(self) -> bool:
        return self._alive

    def queue_depth(self) -> int:
        return len(self._tasks)

    def describe(self) -> dict:
        return {"kind": "ray", "replicas": self.replicas,
                "served_by": dict(self.served_by), "retried": self.retried}

    def hook_mode_info(self, model: str, tl_flags) -> str:
        """``model_info`` with TL hook switches on: asked of a replica (each probes once)."""
        handle = self.plain_handles.get(model)
        if handle is None:
            raise UnknownModel(f"model {model!r} is not served here; served: "
                               f"{', '.join(self.entries)}")
        return handle.hook_mode_info.remote(list(tl_flags)).result()

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
        """Remove the deployments now (and stop Ray if this engine started it)."""
        self._closing = True
        if self._alive or self.handles:
            self._alive = False
            self.handles = {}
            self._teardown()

    # ---- one request ----------------------------------------------------------------------
    async def _relay(self, job: Job, key, stop: asyncio.Event) -> None:
        conn, rid = job.conn, job.request_id
        try:
            handle = self.handles.get(job.submit.graph.model)
            if handle is None:
                raise UnknownModel(f"model {job.submit.graph.model!r} is not served here; "
                                   f"served: {', '.join(self.handles)}")
            if rid in conn.cancelled:  # the client's cancel may overtake its own submit
                raise Cancelled(f"request {rid} was cancelled before it started")
            # Materialising references and copying tensors into the payload grow with the
            # request: done in a thread, not on the front's event loop.
            payload = await asyncio.get_running_loop().run_in_executor(
                None, _payload_of, job)
            out_of_memory = 0
            for attempt in range(1, MAX_ATTEMPTS + 1):
                stream = handle.run.remote(payload)
                answer = RelaySession(conn.store, job.tensors)
                try:
                    finished = await self._pump(stream, job, answer, stop)
                except ray_cluster.RETRYABLE as exc:
                    oom = isinstance(exc, ray_cluster.OUT_OF_MEMORY)
                    out_of_memory += oom
                    why = ("Ray's memory monitor killed it: the node ran out of memory"
                           if oom else type(exc).__name__)
                    if answer.relayed or attempt == MAX_ATTEMPTS or \
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
            if not isinstance(exc, (ReplicaLost, Cancelled)):
                log.exception("request %s failed in the ray engine", rid)
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

    def _teardown(self) -> None:
        try:
            if self.owns_ray:
                ray_cluster.shutdown()
            else:
                for spec in self.specs:
                    ray_cluster.undeploy(spec)
        except Exception:
            log.exception("stopping the ray engine")


__all__ = ["RayEngine", "RemoteEntry"]
