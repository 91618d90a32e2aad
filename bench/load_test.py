"""Issue 5 load test (loopback only, bounded): N concurrent clients x M requests of mixed
kinds against a server subprocess. Every request is compared with its solo run; reports
lost / mismatched counts, p50/p99 latency, throughput, and the server's memory before and
after.

Kinds: read a site and return logits; edit the last token and return nothing; return the
loss (runs alone: not batchable); differentiate the loss and read a gradient (alone); an
unknown op (must be refused).

    .venv/bin/python bench/load_test.py [--clients 64] [--requests 25] [--model tiny-gpt2]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time

import torch

from hookwire.client import Connection
from hookwire.errors import GraphValidationError

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from server_proc import ServerProcess  # noqa: E402

SITE = "blocks.0.hook_resid_post"
FULL = {"slice": [None, None, None]}


def kinds(model: str):
    base = {"model": model, "inputs": {"input_ids": "input_ids"}, "sites": [{"name": SITE}]}
    read = {**base, "nodes": [{"id": 0, "op": "site.read", "args": [0]}],
            "saves": {"resid": 0}, "forward": {"return_type": "logits"}}
    edit = {**base, "nodes": [
        {"id": 0, "op": "site.read", "args": [0]},
        {"id": 1, "op": "setitem", "args": [{"ref": 0}, [FULL, -1, FULL], 0.0]},
        {"id": 2, "op": "site.write", "args": [0, {"ref": 1}], "kwargs": {"mode": "replace"}},
        {"id": 3, "op": "sum", "args": [{"ref": 1}], "kwargs": {"dim": -1}}],
        "saves": {"s": 3}, "forward": {"return_type": None}}
    loss = {**base, "nodes": [{"id": 0, "op": "site.read", "args": [0]},
                              {"id": 1, "op": "mean", "args": [{"ref": 0}]}],
            "saves": {"m": 1}, "forward": {"return_type": "loss"}}
    grad = {**base, "nodes": [{"id": 0, "op": "output.read", "args": ["loss"]},
                              {"id": 1, "op": "site.grad", "args": [0]}],
            "saves": {"g": 1}, "forward": {"return_type": "loss"}, "backward": 0}
    bad = {**base, "nodes": [{"id": 0, "op": "__import__", "args": ["os"]}],
           "forward": {"return_type": "logits"}}
    return {"read": read, "edit": edit, "loss": loss, "grad": grad, "bad": bad}


def run_one(conn, graph, tokens):
    try:
        return conn.run(graph, {"input_ids": tokens}).values
    except GraphValidationError as exc:
        return exc.code


def same(a, b) -> bool:
    if isinstance(a, str) or isinstance(b, str):
        return a == b
    return a.keys() == b.keys() and all(
        torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-5) for k in a)


def rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return -1


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--requests", type=int, default=25)
    ap.add_argument("--model", default="tiny-gpt2")
    args = ap.parse_args()
    graphs = kinds(args.model)
    names = list(graphs)
    gen = torch.Generator().manual_seed(0)
    inputs = [torch.randint(0, 256, (1 + i % 2, 8 + i % 5), generator=gen) for i in range(8)]
    with ServerProcess(args.model) as srv:
        pid = srv.proc.pid
        conn = Connection(srv.url)
        solo = {(k, i): run_one(conn, graphs[k], t) for k in names for i, t in enumerate(inputs)}
        for _ in range(3):  # warm the server up before its baseline memory is read
            run_one(conn, graphs["read"], inputs[0])
        conn.close()
        time.sleep(1.0)
        rss_before = rss_kb(pid)
        lost, mismatched, latencies, errors = [0], [0], [], []
        lock = threading.Lock()
        barrier = threading.Barrier(args.clients)

        def client(c):
            try:
                conn = Connection(srv.url)
            except Exception as exc:
                with lock:
                    errors.append(repr(exc))
                    lost[0] += args.requests
                barrier.abort()
                return
            try:
                barrier.wait()
                for r in range(args.requests):
                    kind, i = names[(c + r) % len(names)], (c * 7 + r) % len(inputs)
                    t0 = time.perf_counter()
                    try:
                        got = run_one(conn, graphs[kind], inputs[i])
                    except Exception as exc:
                        with lock:
                            lost[0] += 1
                            errors.append(repr(exc)[:200])
                        continue
                    with lock:
                        latencies.append(time.perf_counter() - t0)
                        if not same(got, solo[(kind, i)]):
                            mismatched[0] += 1
            finally:
                conn.close()
        t0 = time.perf_counter()
        threads = [threading.Thread(target=client, args=(c,)) for c in range(args.clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(600)
        elapsed = time.perf_counter() - t0
        time.sleep(2.0)
        rss_after = rss_kb(pid)
    latencies.sort()
    total = args.clients * args.requests
    print(json.dumps({
        "model": args.model, "clients": args.clients, "requests_each": args.requests,
        "total": total, "lost": lost[0], "mismatched": mismatched[0],
        "throughput_req_per_s": len(latencies) / elapsed,
        "latency_p50_s": statistics.median(latencies) if latencies else None,
        "latency_p99_s": latencies[int(0.99 * (len(latencies) - 1))] if latencies else None,
        "server_rss_mb_before": rss_before / 1024, "server_rss_mb_after": rss_after / 1024,
        "errors": errors[:5]}, indent=2))
    return 0 if lost[0] == 0 and mismatched[0] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
