"""How the time of the registry's expensive ops grows, against how their cost model's flops
grow (``hookwire.op_costs``), and what a counted flop costs in time for each kind of op.

For each op and size n it prints the predicted (charged) flops, the median wall time over
repeats (min-max), the time per charged flop, and the growth from the previous size:
measured time ratio against predicted flops ratio. A model that grows slower than the time
it predicts would let a request buy more work than the budget says; the last column is that
ratio (measured growth / predicted growth, ~1 or below is honest). At the end: the time per
charged flop of each op relative to a matrix product of the same size (what one unit of
``Limits.max_flops`` buys in time, per kind of op).

    .venv/bin/python -m bench.bench_op_costs            # sizes 64..512
    .venv/bin/python -m bench.bench_op_costs --quick    # sizes 64..256, fewer repeats

CPU only, one process, one thread; timings are noisy on a shared machine: read ratios, not
absolutes.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from hookwire.ops import OPS
from hookwire.shape_probe import run_for_shape


def _meta(value):
    if isinstance(value, torch.Tensor):
        return torch.empty_strided(value.shape, value.stride(), dtype=value.dtype,
                                   device="meta")
    if isinstance(value, tuple):
        return tuple(_meta(v) for v in value)
    return value


CASES = [
    # (label, op, builder of args at size n)
    ("matmul n x n", "matmul", lambda n: (torch.randn(n, n), torch.randn(n, n))),
    ("svd n x n", "svd", lambda n: (torch.randn(n, n),)),
    ("norm nuc n x n", "norm", lambda n: (torch.randn(n, n), "nuc")),
    ("qr n x n", "qr", lambda n: (torch.randn(n, n),)),
    ("eigh n x n", "eigh", lambda n: ((lambda a: a @ a.T)(torch.randn(n, n)),)),
    ("cosine (n,1,n)x(1,n,n)", "cosine_similarity",
     lambda n: (torch.randn(n, 1, n), torch.randn(1, n, n))),
    ("cdist n x n", "cdist", lambda n: (torch.randn(n, n), torch.randn(n, n))),
    ("einsum bij,bjk n^3", "einsum",
     lambda n: ("bij,bjk->bik", torch.randn(8, n, n), torch.randn(8, n, n))),
    ("sort n x 16n", "sort", lambda n: (torch.randn(n, 16 * n),)),
    ("quantile n x 16n", "quantile", lambda n: (torch.randn(n, 16 * n), 0.5, -1)),
    ("fft n x 16n", "fft", lambda n: (torch.randn(n, 16 * n),)),
    ("sum expanded 64n x 64n", "sum", lambda n: (torch.ones(1, 1).expand(64 * n, 64 * n),)),
    ("exp n x 64n", "exp", lambda n: (torch.randn(n, 64 * n),)),
    ("add n x 64n", "add", lambda n: (torch.randn(n, 64 * n), torch.randn(n, 64 * n))),
]


def time_call(fn, args, repeats: int) -> list[float]:
    fn(*args)  # warm up (LAPACK workspaces, thread pools)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn(*args)
        times.append(time.perf_counter() - t0)
    return times


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    sizes = (64, 128, 256) if args.quick else (64, 128, 256, 512)
    repeats = 3 if args.quick else 7
    torch.manual_seed(0)
    torch.set_num_threads(1)  # other processes share the cores: one thread measures steadier
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, sizes {sizes}")
    print(f"{'op':26} {'n':>5} {'pred flops':>11} {'median s':>10} {'min-max s':>19} "
          f"{'ns/flop':>8} {'time x':>7} {'flops x':>7} {'ratio':>6}")
    per_flop: dict[str, float] = {}
    for label, name, build in CASES:
        spec = OPS[name]
        previous = None
        for n in sizes:
            inputs = build(n)
            _, cost = run_for_shape(spec, _meta(inputs), {}, 1 << 40)
            times = time_call(spec.fn, inputs, repeats)
            med = statistics.median(times)
            growth = ""
            if previous is not None:
                t_ratio, f_ratio = med / previous[0], cost.flops / previous[1]
                growth = f"{t_ratio:7.2f} {f_ratio:7.2f} {t_ratio / f_ratio:6.2f}"
            print(f"{label:26} {n:5d} {cost.flops:11.3g} {med:10.5f} "
                  f"{min(times):9.5f}-{max(times):9.5f} {med / cost.flops * 1e9:8.3f} "
                  f"{growth}")
            previous = (med, cost.flops)
        per_flop[label] = previous[0] / previous[1]
    base = per_flop["matmul n x n"]
    print(f"\ntime per charged flop at n={sizes[-1]}, relative to matmul at the same n:")
    for label, value in per_flop.items():
        print(f"  {label:26} {value / base:8.2f}x")


if __name__ == "__main__":
    main()
