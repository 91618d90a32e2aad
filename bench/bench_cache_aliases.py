"""Issue 16 bench: ``run_with_cache()`` of everything, remote against local TL.

TL caches each activation under every alias of its hook point, and one hook point's output is
often the next one's input: a local cache holds far fewer storages than names. Remotely each
storage now travels once (aliases are views made on the client). Reported: cache names, local
distinct storages and their bytes, tensors and bytes the server sent, and wall time remote /
local (median and min-max of ``--repeat`` runs, interleaved). The remote cache is checked equal
to the local one, and its aliasing equal to the local aliasing.

One server subprocess on 127.0.0.1 hosting ``gpt2-small-random``; the local model is the same
built-in (same config and seed, so the same weights) in this process.

    .venv/bin/python bench/bench_cache_aliases.py [--batch 8] [--seq 128] [--repeat 3]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

import hookwire
import hookwire.transformerlens as htl
from hookwire.protocol import Result
from hookwire.server.models import load_model

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from server_proc import ServerProcess  # noqa: E402


def views(cache) -> list:
    groups: dict = {}
    for key in cache.keys():
        t = cache[key]
        groups.setdefault((t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape),
                           tuple(t.stride())), []).append(key)
    return sorted(sorted(g) for g in groups.values())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="gpt2-small-random")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    local = load_model(args.model).bridge
    tokens = torch.randint(0, 50000, (args.batch, args.seq),
                           generator=torch.Generator().manual_seed(0))
    with ServerProcess(args.model) as srv:
        hookwire.configure(url=srv.url)
        remote = htl.RemoteModel(args.model)
        times = {"local": [], "remote": []}
        sent = None
        local.run_with_cache(tokens[:, :8])  # warm both up (first-call costs are not timed)
        remote.run_with_cache(tokens[:, :8], progress=False)
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            _, want = local.run_with_cache(tokens)
            times["local"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            run = remote.run_with_cache(tokens, blocking=False, progress=False)
            events = list(run.events())
            _, got = run.result()
            times["remote"].append(time.perf_counter() - t0)
            results = [e for e in events if isinstance(e, Result)
                       and e.name.startswith("__escaped_")]
            sent = (sum(1 for e in results if e.alias_of is None),
                    sum(e.tensor.nbytes() for e in results if e.alias_of is None),
                    sum(1 for e in results if e.alias_of is not None))
            assert list(got.keys()) == list(want.keys())
            for key in want.keys():
                torch.testing.assert_close(got[key], want[key], rtol=1e-4, atol=1e-5)
            assert views(got) == views(want)
            del got, want, run, events
        _, want = local.run_with_cache(tokens)
        storages = {}
        for key in want.keys():
            t = want[key]
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        names_bytes = sum(want[k].nbytes for k in want.keys())
    ratios = [r / l for r, l in zip(times["remote"], times["local"])]
    print(f"{args.model} {args.batch}x{args.seq}: {len(want.keys())} cache names "
          f"({names_bytes / 2**20:.0f} MiB if each sent alone); local holds {len(storages)} "
          f"storages ({sum(storages.values()) / 2**20:.0f} MiB); the server sent {sent[0]} "
          f"tensors ({sent[1] / 2**20:.0f} MiB) and {sent[2]} aliases")
    print(f"time remote/local: median {statistics.median(ratios):.2f} (min {min(ratios):.2f}, "
          f"max {max(ratios):.2f}); local median {statistics.median(times['local']):.2f} s, "
          f"remote median {statistics.median(times['remote']):.2f} s; aliasing equal to local")


if __name__ == "__main__":
    main()
