"""Starting and stopping a hookwire server on the Ray engine in tests: one local Ray instance
(127.0.0.1 only), stopped with the server; whatever Ray process outlives that is killed by its
PID, even when a test failed."""
from __future__ import annotations

import psutil

import hookwire.server as hs

# Two replicas of tiny-gpt2 (routing, failover), one of tiny-llama; half a CPU each, so all
# three fit on a 2-core machine next to Serve's controller.
RAY_REPLICAS = {"tiny-gpt2": 2, "tiny-llama": 1}


def our_processes() -> dict[int, psutil.Process]:
    """This process's descendants (Ray's raylet, GCS, workers and replicas among them)."""
    return {p.pid: p for p in psutil.Process().children(recursive=True)}


def start_ray_server(models=("tiny-gpt2", "tiny-llama"), replicas=None, **kwargs):
    """(server, pids of processes that existed before it) -- pass both to stop_ray_server."""
    before = set(our_processes())
    try:
        srv = hs.start(models=list(models), port=0, engine="ray",
                       replicas=replicas or RAY_REPLICAS, num_cpus_per_replica=0.5, **kwargs)
    except BaseException:
        stop_ray_server(None, before)
        raise
    return srv, before


def stop_ray_server(srv, before: set[int]) -> None:
    """Stop the server (and the local Ray it started); then kill, by PID, every process it
    left behind (checked by psutil against its start time, so a reused PID is never hit)."""
    started = {pid: p for pid, p in our_processes().items() if pid not in before}
    try:
        if srv is not None:
            srv.stop()
    finally:
        leftovers = [p for p in started.values() if p.is_running()]
        for p in leftovers:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(leftovers, timeout=10)
