"""Issue 5 bench: throughput of 16 concurrent clients sending activation-patching requests
(batch 1, 32 tokens) to ``gpt2-small-random``, with cross-user batching on and off (off = one
request at a time, as NDIF runs them), measured in the same run.

Each client is its own process (its own GIL, like separate users) with a weightless
RemoteModel stand-in; every request is a TL ``run_with_hooks(remote=True)`` patching one
(layer, position) of the residual stream from a clean cache, with the logit difference as
``metric=`` (so a scalar comes back, not 6 MB of logits). All clients start together (a
barrier) and each sends its requests back to back. Reported: requests per second in both
modes, their ratio, and per-request latency percentiles.

    .venv/bin/python bench/bench_batching.py [--clients 16] [--requests 12]
"""
from __future__ import annotations

import argparse
import functools
import json
import multiprocessing as mp
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from server_proc import ServerProcess  # noqa: E402

MODEL = "gpt2-small-random"
SEQ = 32


def patch(resid, hook, pos, clean):
    resid[:, pos, :] = clean[:, pos, :]


_BARRIER = None


def _init(barrier):
    global _BARRIER
    _BARRIER = barrier


def client(args):
    url, index, n_requests = args
    import torch

    import hookwire
    import hookwire.transformerlens as htl

    # A client does little tensor work: one thread each, or 16 processes' thread pools
    # would fight the server for the machine's cores.
    torch.set_num_threads(1)
    hookwire.configure(url=url)
    model = htl.RemoteModel(MODEL)
    gen = torch.Generator().manual_seed(index)
    clean = torch.randint(0, model.cfg.d_vocab, (1, SEQ), generator=gen)
    corrupt = clean.clone()
    corrupt[0, 5] = (corrupt[0, 5] + 1) % model.cfg.d_vocab
    _, cache = model.run_with_cache(clean, names_filter=lambda n: n.endswith("resid_pre"),
                                    progress=False)
    name = "blocks.{}.hook_resid_pre"
    def logit_diff(logits):
        return logits[:, -1, 5] - logits[:, -1, 7]

    model.run_with_hooks(corrupt, metric=logit_diff, progress=False)  # warm-up
    _BARRIER.wait()
    started = time.time()
    latencies, first = [], None
    for i in range(n_requests):
        layer, pos = i % model.cfg.n_layers, (index + i) % SEQ
        hook = functools.partial(patch, pos=pos, clean=cache[name.format(layer)])
        t0 = time.perf_counter()
        value = model.run_with_hooks(corrupt, fwd_hooks=[(name.format(layer), hook)],
                                     metric=logit_diff, progress=False)
        latencies.append(time.perf_counter() - t0)
        if first is None:
            first = value.tolist()
    return started, time.time(), latencies, first


def run_mode(batching: bool, n_clients: int, n_requests: int) -> dict:
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(n_clients)
    with ServerProcess(MODEL, batching=batching) as srv, \
            ctx.Pool(n_clients, initializer=_init, initargs=(barrier,)) as pool:
        results = pool.map(client, [(srv.url, i, n_requests) for i in range(n_clients)])
    start_at = min(r[0] for r in results)
    end = max(r[1] for r in results)
    latencies = sorted(x for r in results for x in r[2])
    total = n_clients * n_requests
    return {"batching": batching, "requests": total, "seconds": end - start_at,
            "requests_per_s": total / (end - start_at),
            "latency_p50_s": statistics.median(latencies),
            "latency_p99_s": latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))],
            "first_results": [r[3] for r in results]}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--requests", type=int, default=12)
    args = ap.parse_args()
    on = run_mode(True, args.clients, args.requests)
    off = run_mode(False, args.clients, args.requests)
    # Same requests, same answers, whichever way they ran.
    import torch
    torch.testing.assert_close(torch.tensor(on.pop("first_results")),
                               torch.tensor(off.pop("first_results")), rtol=1e-4, atol=1e-4)
    print(json.dumps({"model": MODEL, "clients": args.clients, "seq": SEQ,
                      "batching_on": on, "batching_off": off,
                      "throughput_ratio": on["requests_per_s"] / off["requests_per_s"]},
                     indent=2))


if __name__ == "__main__":
    main()
