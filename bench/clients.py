"""N concurrent clients, each its own process (its own GIL, like separate users), running a
workload's remote unit against one server. The processes start once and are reused for every
workload; a barrier starts each round's clients together.

Each client holds only weightless stand-ins (``RemoteModel``, ``RemoteIntervenableModel``);
it runs one unit as warm-up, waits at the barrier, then runs ``reps`` units back to back.
"""
from __future__ import annotations

import multiprocessing as mp
import statistics
import time

_BARRIER = None
_TOOLS: dict = {}


def _init(barrier, url: str):
    global _BARRIER
    import torch

    import hookwire
    torch.set_num_threads(1)   # a client does little tensor work; leave the cores to the server
    hookwire.configure(url=url)
    _BARRIER = barrier


def _tools(model: str, batch: int):
    import hookwire.pyvene as hpv
    import hookwire.transformerlens as htl

    from bench.workloads import Tools, make_inputs
    if (model, batch) not in _TOOLS:
        remote = htl.RemoteModel(model)
        cfg = remote.cfg
        inputs = make_inputs(cfg.n_layers, cfg.n_heads, cfg.d_model, batch)
        _TOOLS[(model, batch)] = Tools(inputs, remote=remote,
                                       remote_pv=lambda c: hpv.RemoteIntervenableModel(c, model))
    return _TOOLS[(model, batch)]


def _client(args):
    import torch

    from bench.workloads import BY_NAME
    model, batch, name, reps, index = args
    workload = BY_NAME[name]
    tools = _tools(model, batch)
    tools.state = {"round": index}
    with torch.set_grad_enabled(workload.grad):
        if workload.setup is not None:
            workload.setup(tools)
        unit = workload.columns["remote"]
        unit(tools)                                    # warm-up
        _BARRIER.wait(timeout=600)
        started, latencies = time.time(), []
        for r in range(reps):
            tools.state["round"] = index * reps + r   # clients spread over a sweep's calls
            t0 = time.perf_counter()
            unit(tools)
            latencies.append(time.perf_counter() - t0)
    return started, time.time(), latencies


class ConcurrentClients:
    def __init__(self, url: str, n: int):
        ctx = mp.get_context("spawn")
        self.n = n
        self.pool = ctx.Pool(n, initializer=_init, initargs=(ctx.Barrier(n), url))

    def run(self, model: str, batch: int, workload: str, reps: int) -> dict:
        results = self.pool.map(_client, [(model, batch, workload, reps, i)
                                          for i in range(self.n)], chunksize=1)
        start = min(r[0] for r in results)
        end = max(r[1] for r in results)
        lat = [x for r in results for x in r[2]]
        return {"clients": self.n, "units": len(lat), "seconds": end - start,
                "units_per_s": len(lat) / (end - start),
                "latency_s": {"median": statistics.median(lat), "min": min(lat),
                              "max": max(lat)}}

    def close(self):
        self.pool.close()
        self.pool.join()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if exc[0] is not None:
            self.pool.terminate()
            self.pool.join()
        else:
            self.close()
