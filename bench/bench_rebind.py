"""Client cost of putting stored tensors back: rebind near the hooks vs the whole-heap walk.

A remote ``run_with_cache`` on tiny-gpt2 (1 x 16; TL and pyvene imported, as in a notebook),
alternately with ``hookwire.rebind``'s search near the hooks and with the plain
``gc.get_referrers`` walk it falls back to; median and min of N calls each, interleaved in one
process against an in-process server. Run: ``.venv/bin/python bench/bench_rebind.py [N]``.
"""
from __future__ import annotations

import statistics
import sys
import time

import pyvene  # noqa: F401  (a realistic client heap)
import torch

import hookwire
import hookwire.rebind as rb
import hookwire.remote_call as remote_call
import hookwire.server as hs
import hookwire.transformerlens as htl


def heap_walk_only(olds, news, skip=(), **near_the_hooks):
    return rb.rebind(olds, news, skip)


def main(rounds: int = 8) -> None:
    torch.set_num_threads(1)
    srv = hs.start(models=["tiny-gpt2"], port=0)
    try:
        hookwire.configure(url=srv.url)
        model = htl.RemoteModel("tiny-gpt2")
        tokens = torch.randint(0, 200, (1, 16), generator=torch.Generator().manual_seed(0))
        for _ in range(3):
            model.run_with_cache(tokens, remote=True, progress=False)
        times = {"near the hooks": [], "heap walk": []}
        for _ in range(rounds):
            for name, fn in (("near the hooks", rb.rebind), ("heap walk", heap_walk_only)):
                remote_call.rebind = fn
                t0 = time.perf_counter()
                model.run_with_cache(tokens, remote=True, progress=False)
                times[name].append((time.perf_counter() - t0) * 1000)
        remote_call.rebind = rb.rebind
        for name, values in times.items():
            print(f"{name}: median {statistics.median(values):.1f} ms, min {min(values):.1f} ms")
        ratio = statistics.median(times["near the hooks"]) / statistics.median(times["heap walk"])
        print(f"ratio near / heap walk: {ratio:.2f}")
    finally:
        srv.stop()


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 8)
