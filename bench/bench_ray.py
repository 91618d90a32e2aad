"""Ray engine: throughput with 1 and 2 replicas under 16 concurrent clients, and the
per-request overhead of the Ray path against the embedded engine. Every figure comes from
this one run; servers are ``hookwire serve`` subprocesses on 127.0.0.1, stopped by PID (with
every process they started).

Each request: tiny-gpt2 (or --model), one sequence of --seq tokens, the residual stream after
block 0 scaled and saved, logits returned. Answers are checked against the embedded engine's.

    .venv/bin/python bench/bench_ray.py [--clients 16] [--requests 20] [--rounds 3]

All three servers (embedded, Ray with 1 replica, Ray with 2) run at once and are measured in
alternating rounds, so each sees the same background load on a shared machine.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time

import psutil
import torch

from hookwire.server.cli import READY_PREFIX
from hookwire.client import Connection

SITE = "blocks.0.hook_resid_post"


def graph(model: str, k: int) -> dict:
    return {"model": model, "inputs": {"input_ids": "input_ids"}, "sites": [{"name": SITE}],
            "nodes": [{"id": 0, "op": "site.read", "args": [0]},
                      {"id": 1, "op": "mul", "args": [{"ref": 0}, 0.5 + 0.1 * (k % 7)]},
                      {"id": 2, "op": "site.write", "args": [0, {"ref": 1}],
                       "kwargs": {"mode": "replace"}}],
            "saves": {"resid": 1}, "forward": {"return_type": "logits"}}


class Server:
    """``hookwire serve`` in a subprocess; stop() ends it and every process it started."""

    def __init__(self, model: str, *flags: str):
        cmd = [sys.executable, "-m", "hookwire", "serve", "--model", model, "--port", "0",
               *flags]
        # One torch thread in every server (Ray gives its replicas one per CPU they hold):
        # the engines differ in how requests reach the model, not in torch's threading.
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                     text=True, env=env)
        self.t0 = time.perf_counter()
        for line in self.proc.stdout:
            if line.startswith(READY_PREFIX):
                self.url = line.rsplit(" ", 1)[1].strip()
                self.ready_s = time.perf_counter() - self.t0
                return
        self.stop()
        raise RuntimeError(f"server {' '.join(cmd)} did not start")

    def stop(self) -> None:
        try:
            family = psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            family = []
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(90)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        left = [p for p in family if p.is_running()]
        for p in left:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(left, timeout=10)


def sequential_latency(url: str, model: str, tokens, n: int) -> list[float]:
    conn = Connection(url)
    try:
        for k in range(5):  # warm-up
            conn.run(graph(model, k), {"input_ids": tokens})
        times = []
        for k in range(n):
            t0 = time.perf_counter()
            conn.run(graph(model, k), {"input_ids": tokens})
            times.append(time.perf_counter() - t0)
        return times
    finally:
        conn.close()


def throughput(url: str, model: str, tokens, clients: int, requests: int, reference) -> dict:
    conns = [Connection(url) for _ in range(clients)]
    for c in conns[:4]:
        c.run(graph(model, 0), {"input_ids": tokens})  # warm-up
    barrier = threading.Barrier(clients)
    mismatched, errors = [0], []
    lock = threading.Lock()

    def client(c: int):
        barrier.wait()
        for r in range(requests):
            k = c * requests + r
            try:
                out = conns[c].run(graph(model, k), {"input_ids": tokens}).values
            except Exception as exc:
                with lock:
                    errors.append(repr(exc)[:200])
                continue
            if not torch.allclose(out["__logits__"], reference[k % 7], rtol=1e-5, atol=1e-6):
                with lock:
                    mismatched[0] += 1

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join(600)
    elapsed = time.perf_counter() - t0
    for c in conns:
        c.close()
    done = clients * requests - len(errors)
    return {"req_per_s": round(done / elapsed, 2), "elapsed_s": round(elapsed, 2),
            "mismatched": mismatched[0], "errors": errors[:3]}


def main() -> int:
    torch.set_num_threads(1)
    ap = argparse.ArgumentParser()
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--requests", type=int, default=20)
    ap.add_argument("--latency-requests", type=int, default=30)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--model", default="tiny-gpt2")
    ap.add_argument("--seq", type=int, default=16)
    ap.add_argument("--cpus-per-replica", default="0.5")
    args = ap.parse_args()
    tokens = torch.randint(0, 256, (1, args.seq), generator=torch.Generator().manual_seed(0))
    report: dict = {"model": args.model, "clients": args.clients,
                    "requests_per_client": args.requests, "tokens": list(tokens.shape),
                    "cpus": os.cpu_count()}

    runs = {"embedded": ()}
    for n in (1, 2):
        runs[f"ray_{n}_replica{'s' if n > 1 else ''}"] = (
            "--engine", "ray", "--replicas", str(n), "--cpus-per-replica", args.cpus_per_replica)
    # All three servers up at once and measured in alternating rounds: the machine is shared
    # and noisy, so each engine sees the same background load.
    servers: dict[str, Server] = {}
    try:
        for label, flags in runs.items():
            servers[label] = Server(args.model, *flags)
            print(f"[bench_ray] {label} up in {servers[label].ready_s:.1f} s", file=sys.stderr,
                  flush=True)
        conn = Connection(servers["embedded"].url)
        reference = [conn.run(graph(args.model, k), {"input_ids": tokens})
                     .values["__logits__"] for k in range(7)]
        conn.close()
        lat: dict = {label: [] for label in runs}
        tps: dict = {label: [] for label in runs}
        for rnd in range(args.rounds):
            for label, server in servers.items():
                lat[label] += sequential_latency(server.url, args.model, tokens,
                                                 args.latency_requests)
                tp = throughput(server.url, args.model, tokens, args.clients, args.requests,
                                reference)
                tps[label].append(tp)
                print(f"[bench_ray] round {rnd} {label}: {json.dumps(tp)}", file=sys.stderr,
                      flush=True)
        for label, server in servers.items():
            report[label] = {
                "startup_s": round(server.ready_s, 1),
                "latency_median_ms": round(1000 * statistics.median(lat[label]), 2),
                "latency_p90_ms": round(1000 * sorted(lat[label])[int(0.9 * len(lat[label]))],
                                        2),
                "req_per_s_median": statistics.median(t["req_per_s"] for t in tps[label]),
                "req_per_s_rounds": [t["req_per_s"] for t in tps[label]],
                "mismatched": sum(t["mismatched"] for t in tps[label]),
                "errors": [e for t in tps[label] for e in t["errors"]][:3]}
    finally:
        for server in servers.values():
            server.stop()

    emb = report["embedded"]
    r1, r2 = report["ray_1_replica"], report["ray_2_replicas"]
    report["ray_overhead_ms_per_request"] = round(
        r1["latency_median_ms"] - emb["latency_median_ms"], 2)
    report["ray_latency_ratio"] = round(r1["latency_median_ms"] / emb["latency_median_ms"], 2)
    report["throughput_2_over_1_replica"] = round(
        r2["req_per_s_median"] / r1["req_per_s_median"], 2)
    report["throughput_ray1_over_embedded"] = round(
        r1["req_per_s_median"] / emb["req_per_s_median"], 2)
    print(json.dumps(report, indent=2))
    ok = all(report[k]["mismatched"] == 0 and not report[k]["errors"] for k in runs)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
