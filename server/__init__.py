"""hookwire.server: host models and serve intervention graphs over websockets.

``start(models=..., port=0)`` runs a real server on 127.0.0.1 in a background thread and
returns a handle with ``.url`` and ``.stop()`` -- for tests, examples and notebooks.
"""
from __future__ import annotations

import asyncio
import threading

from hookwire.server.app import HookwireServer
from hookwire.server.worker import BATCH_WINDOW_S
from hookwire.server.models import (BUILTIN_MODELS, HostedModel, host_model_object,
                                    load_model)
from hookwire.validate import Limits


class ServerHandle:
    """A :class:`HookwireServer` running on its own event loop in a background thread, as
    ``start()`` returns it: ``.url``, ``.stop()`` (stops the front, then the engine; queued
    requests get ``ServerShuttingDown``) and use as a context manager."""
    def __init__(self, server: HookwireServer):
        self.server = server
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="hookwire-server", daemon=True)

    def _run(self):
        try:
            asyncio.run(self._main())
        except BaseException as exc:  # surfaced to the starter
            self._error = exc
            self._ready.set()

    async def _main(self):
        self._stop = asyncio.Event()
        await self.server.serve_async(ready=self._ready, stop=self._stop)

    def start(self, timeout: float = 120) -> "ServerHandle":
        self._thread.start()
        if not self._ready.wait(timeout):
            raise RuntimeError("hookwire server did not start in time")
        if self._error is not None:
            raise RuntimeError(f"hookwire server failed to start: {self._error}") from self._error
        return self

    @property
    def url(self) -> str:
        return self.server.url

    def stop(self, timeout: float = 30) -> None:
        loop = self.server.loop
        if loop is not None and self._thread.is_alive():
            loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(timeout)
        self.server.worker.stop()
        if self.server.worker.is_alive():
            self.server.worker.join(timeout)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


def start(models: dict | list | None = None, host: str = "127.0.0.1", port: int = 0,
          api_keys: list[str] | None = None, limits: Limits | None = None,
          batching: bool = True, batch_window_s: float = BATCH_WINDOW_S,
          engine: str = "embedded", replicas: int | dict = 1, ray_address: str | None = None,
          num_cpus_per_replica: float = 1, num_gpus_per_replica: float = 0,
          device_map=None, dtype=None, device=None,
          tokenizers: dict | None = None) -> ServerHandle:
    """Start a server in this process. ``models`` maps names to model objects (TL bridges or
    HF models) or is a list of built-in names / checkpoint paths. ``batching=False`` runs
    requests one at a time (as NDIF does); otherwise requests arriving within
    ``batch_window_s`` of each other share a forward pass (the window is not waited when no
    other connection could send a batch mate).

    ``engine="process"`` runs each model (a list of names or paths) in a process of its own
    on this machine, so the front's work never holds the model's interpreter lock
    (server/process_engine.py). ``engine="ray"`` (needs ``hookwire[ray]``) runs each model as a Ray Serve deployment of
    ``replicas`` replicas (or {model: replicas}) instead of a thread here: on the cluster at
    ``ray_address`` ("auto": one started with ``ray start``), or on a private local Ray. Each
    replica gets ``num_cpus_per_replica``/``num_gpus_per_replica`` and loads its model with
    accelerate's ``device_map`` (e.g. "auto": across the replica's GPUs).

    ``dtype`` ("auto", "float32", "bfloat16", "float16"): built-in models are built in it,
    checkpoints load in it ("auto"/None: their own dtype), model objects are converted to it.
    ``device`` ("cpu", "cuda", "cuda:N", "auto": the first GPU if any; None: the CPU for
    models loaded here, objects stay where they are). ``tokenizers`` maps names of HF model
    objects to their tokenizers (without one a model is served without a tokenizer: clients
    pass token ids)."""
    if models is None:
        models = ["tiny-gpt2"]
    if engine in ("ray", "process"):
        if not isinstance(models, (list, tuple)):
            raise TypeError(f"engine={engine!r} loads models by name or checkpoint path in "
                            "processes of their own: pass a list, not model objects")
        if engine == "ray":
            from hookwire.server.ray_engine import RayEngine  # imports ray: only on request

            relayed = RayEngine(list(models), replicas=replicas, limits=limits,
                                batching=batching, window_s=batch_window_s,
                                address=ray_address, num_cpus_per_replica=num_cpus_per_replica,
                                num_gpus_per_replica=num_gpus_per_replica,
                                device_map=device_map, dtype=dtype, device=device)
        else:
            from hookwire.server.process_engine import ProcessEngine

            relayed = ProcessEngine(list(models), limits=limits, batching=batching,
                                    window_s=batch_window_s, device_map=device_map,
                                    dtype=dtype, device=device)
        try:
            server = HookwireServer({}, host=host, port=port, api_keys=api_keys, limits=limits,
                                    batching=batching, engine=relayed)
            return ServerHandle(server).start()
        except BaseException:
            relayed.close()
            raise
    if engine != "embedded":
        raise ValueError(f"unknown engine {engine!r}: 'embedded', 'process' or 'ray'")
    if isinstance(models, (list, tuple)):
        hosted = {}
        for spec in models:
            h = load_model(spec, device_map=device_map, dtype=dtype, device=device)
            hosted[h.name] = h
    else:
        hosted = {name: host_model_object(name, m, (tokenizers or {}).get(name), dtype=dtype,
                                          device=device)
                  for name, m in models.items()}
    server = HookwireServer(hosted, host=host, port=port, api_keys=api_keys, limits=limits,
                            batching=batching, batch_window_s=batch_window_s)
    return ServerHandle(server).start()


__all__ = ["start", "ServerHandle", "HookwireServer", "load_model", "BUILTIN_MODELS",
           "HostedModel"]
