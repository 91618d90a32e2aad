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

import dataclasses
import logging
from dataclasses import dataclass

from hookwire.errors import UnknownModel
from hookwire.server import ray_cluster
from hookwire.server.relay_engine import RelayEngine
from hookwire.server.worker import BATCH_WINDOW_S
from hookwire.validate import Limits

log = logging.getLogger("hookwire.server.ray")


@dataclass
class RemoteEntry:
    """What the front needs of a model served by replicas: its ``model_info`` answer."""
    info_json: str


class RayEngine(RelayEngine):
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
    RETRYABLE = ray_cluster.RETRYABLE
    OUT_OF_MEMORY = ray_cluster.OUT_OF_MEMORY
    OUT_OF_MEMORY_WHY = "Ray's memory monitor killed it: the node ran out of memory"

    def __init__(self, models: list[str], replicas: int | dict = 1, limits: Limits | None = None,
                 batching: bool = True, window_s: float = BATCH_WINDOW_S,
                 address: str | None = None, num_cpus_per_replica: float = 1,
                 num_gpus_per_replica: float = 0, device_map=None,
                 ray_num_cpus: int | None = None, dtype=None, device=None,
                 replica_class=None):
        self._init_relay(limits, batching)
        self.replicas = replicas
        self.owns_ray = ray_cluster.connect(address, num_cpus=ray_num_cpus)
        self.specs = list(models)
        self.handles: dict = {}
        self.plain_handles: dict = {}
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

    # ---- what differs from the process engine ---------------------------------------------
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

    async def _open_stream(self, model: str, payload: dict):
        return self.handles[model].run.remote(payload)

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
