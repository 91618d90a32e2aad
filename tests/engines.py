"""Engines as a test parameter: one test, written once, run against every way a server can
hold its models.

A test (or a module, through ``pytestmark``) marked ``@pytest.mark.engines(...)`` is run once
per engine named; conftest's ``server`` fixture then starts the server that engine needs:

- ``"embedded"`` -- the models run in the server's process (the default, unmarked tests too);
- ``"ray"``      -- the models run as Ray Serve replicas (tests/ray_helpers.py);
- ``"process"``  -- each model runs in a process of its own (server/process_engine.py);
- ``"sharded"``  -- each model is split over two devices with accelerate's ``device_map``
  (here the CPU and disk offload, the dispatch machinery that moves activations between GPUs).

``local_models`` stay the unsharded, in-process objects, so every engine is compared with the
same local run. Ray takes a minute to start, so one Ray server serves every Ray-engine test of
the session (``RAY_SERVER``): conftest runs those tests one after another at the end of their
xdist group and stops the server after the last of them, before anything else in that worker
(the other Ray files start private Ray instances) can run.
"""
from __future__ import annotations

import pytest

ENGINES = ("embedded", "ray", "process", "sharded")

# The TL core tests re-run on every engine, and those re-run out of the front's process only
# (the sharded models offload to disk: each forward re-reads half the weights, so only a
# cross-section runs there).
EVERY_ENGINE = pytest.mark.engines("embedded", "ray", "process", "sharded")
ALSO_OUT_OF_PROCESS = pytest.mark.engines("embedded", "ray", "process")

# Where each tiny model's layers go on the sharded engine: the first half on the CPU, the
# second half offloaded to disk.
TWO_PARTS = {
    "tiny-gpt2": {"transformer.wte": "cpu", "transformer.wpe": "cpu", "transformer.drop": "cpu",
                  "transformer.h.0": "cpu", "transformer.h.1": "disk",
                  "transformer.ln_f": "disk", "lm_head": "disk"},
    "tiny-llama": {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu",
                   "model.layers.0": "cpu", "model.layers.1": "disk", "model.norm": "disk",
                   "lm_head": "disk"},
}


def engine_of(item: pytest.Item) -> str:
    """The engine a collected test runs on ("embedded" when it is not parametrized)."""
    callspec = getattr(item, "callspec", None)
    return callspec.params.get("engine", "embedded") if callspec is not None else "embedded"


def runs_on_its_engine(item: pytest.Item) -> bool:
    """False for a front its module runs on the embedded engine only (the module's
    ``FRONTS_ON_EMBEDDED_ONLY``): conftest leaves such combinations out of the collection."""
    callspec = getattr(item, "callspec", None)
    if engine_of(item) == "embedded" or callspec is None:
        return True
    return callspec.params.get("front") not in getattr(item.module, "FRONTS_ON_EMBEDDED_ONLY", ())


class SharedRayServer:
    """One Ray-engine server for the session's Ray-engine tests: started by the first test
    that needs it, stopped (every process Ray started killed by PID) by ``stop``."""

    def __init__(self) -> None:
        self._server = None
        self._before: set[int] = set()

    def get(self, models):
        if self._server is None:
            from ray_helpers import start_ray_server

            self._server, self._before = start_ray_server(models)
        return self._server

    def stop(self) -> None:
        if self._server is None:
            return
        from ray_helpers import stop_ray_server

        server, self._server = self._server, None
        stop_ray_server(server, self._before)


RAY_SERVER = SharedRayServer()
