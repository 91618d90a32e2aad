"""How long single ops really take against what ``hookwire.op_time`` estimates before they
run (``Limits.max_node_seconds``), each on its worst inputs.

The server measures its device's rates once (``server/device_rates.py``: a matrix product
and an add); each op's estimate is its cost (``hookwire.op_costs``) priced at those rates.
For every registered elementwise op, reduction and sort, and for the matrix product, this
times the op on several kinds of inputs (normal, huge, tiny, inf, nan; every pair for
binary ops), one thread, as the model worker runs it (subnormals flushed), and prints the
slowest kind's time over the estimate. Above 1 an op of that kind can run longer than its
estimate says: the ``actual / estimate`` column is how much, and the summary names the
worst.

    .venv/bin/python bench/bench_op_time.py                   # 2^24 elements (64 MiB)
    .venv/bin/python bench/bench_op_time.py --elements 4194304 --ops fmod,sin,sort

CPU only; timings are noisy on a shared machine (best of --repeats).
"""
from __future__ import annotations

import argparse
import time

import torch

from hookwire.op_costs import Pointwise, Reduction, Sorting
from hookwire.ops import OPS
from hookwire.server.device_rates import measure
from hookwire.shape_probe import run_for_shape

KINDS = {"normal": lambda n: torch.randn(n), "huge": lambda n: torch.full((n,), 3e38),
         "tiny": lambda n: torch.full((n,), 1.5e-38), "neg_huge": lambda n: torch.full((n,), -3e38),
         "inf": lambda n: torch.full((n,), float("inf")),
         "nan": lambda n: torch.full((n,), float("nan"))}


def best_seconds(fn, repeats: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def meta(t: torch.Tensor) -> torch.Tensor:
    return torch.empty(t.shape, dtype=t.dtype, device="meta")


def candidates(name, spec, values):
    """(label, args) pairs to time: one per input kind, every pair for binary ops."""
    binary = len(spec.required) >= 2 and spec.required[1] in ("tn", "t")
    if isinstance(spec.cost, Sorting) or isinstance(spec.cost, Reduction):
        return [(k, (v,)) for k, v in values.items() if k in ("normal", "nan", "inf")]
    if binary:
        return [(f"{a},{b}", (values[a], values[b])) for a in values for b in values]
    return [(k, (v,)) for k, v in values.items()]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--elements", type=int, default=1 << 24)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--ops", default="")
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    rates = measure(torch.device("cpu"))
    print(f"rates: {rates.contraction_flops / 1e9:.1f} GFLOP/s matrix product, "
          f"{rates.element_ops / 1e9:.2f} G elements/s add")
    n = args.elements
    values = {k: make(n) for k, make in KINDS.items()}
    wanted = set(filter(None, args.ops.split(",")))
    rows = []
    side = 2048
    a = torch.randn(side, side)
    _, cost = run_for_shape(OPS["matmul"], (meta(a), meta(a)), {}, 1 << 40)
    rows.append((best_seconds(lambda: a @ a, args.repeats) / rates.seconds(cost), "matmul",
                 f"{side}x{side}", rates.seconds(cost)))
    for name, spec in sorted(OPS.items()):
        if wanted and name not in wanted:
            continue
        if not isinstance(spec.cost, (Pointwise, Reduction, Sorting)):
            continue
        worst = None
        for label, call_args in candidates(name, spec, values):
            try:
                _, cost = run_for_shape(spec, tuple(meta(t) for t in call_args), {}, 1 << 40)
                seconds = best_seconds(lambda: spec.fn(*call_args), args.repeats)
            except Exception:
                continue  # not defined for these inputs (dtype, arity)
            ratio = seconds / rates.seconds(cost)
            if worst is None or ratio > worst[0]:
                worst = (ratio, name, label, rates.seconds(cost))
        if worst is not None:
            rows.append(worst)
            print(f"{worst[1]:16} worst on {worst[2]:18} actual / estimate {worst[0]:6.2f} "
                  f"(estimate {worst[3] * 1e3:8.1f} ms)", flush=True)
    rows.sort(reverse=True)
    print("\nslowest against their estimates:")
    for ratio, name, label, est in rows[:8]:
        print(f"  {name:16} {label:18} {ratio:6.2f}x")


if __name__ == "__main__":
    main()
