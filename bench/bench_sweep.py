"""A residual-patching sweep, call by call vs pipelined: patch ``blocks.L.hook_resid_pre`` at
one position with the clean run's value, for every (layer, position), on gpt2-small-random
(batch 1, 16 tokens: 12 x 16 = 192 calls), and read the logit difference.

* call by call: ``model.run_with_hooks(...)`` 192 times, each waiting for its answer;
* pipelined: the same 192 calls with ``blocking=False``, then ``hookwire.gather(runs)``: the
  requests are in flight together (connections from ``hookwire.client``'s pool) and the
  server co-batches them.

Results are checked equal (pipelined vs call by call, and a sample against local TL).
Ratios come from one run (machines are noisy); the server runs in its own process.

    python bench/bench_sweep.py [--model gpt2-small-random] [--repeats 3] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

import hookwire
import hookwire.transformerlens as htl
from hookwire.server.models import load_model

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from server_proc import ServerProcess  # noqa: E402

MODEL = "gpt2-small-random"


def sweep(model, clean_cache, corrupt, blocking: bool):
    n_layers, seq = model.cfg.n_layers, corrupt.shape[1]
    calls = []
    for layer in range(n_layers):
        name = f"blocks.{layer}.hook_resid_pre"
        for pos in range(seq):
            clean = clean_cache[name][:, pos].clone()

            def patch(act, hook, pos=pos, clean=clean):
                act[:, pos] = clean
                return act
            calls.append(model.run_with_hooks(corrupt, fwd_hooks=[(name, patch)],
                                              blocking=blocking))
    out = calls if blocking else hookwire.gather(calls)
    return torch.stack([logits[0, -1] for logits in out])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=MODEL)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seq", type=int, default=16)
    ap.add_argument("--json")
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    local = load_model(args.model).bridge
    gen = torch.Generator().manual_seed(0)
    clean = torch.randint(0, 256, (1, args.seq), generator=gen)
    corrupt = torch.randint(0, 256, (1, args.seq), generator=gen)
    _, clean_cache = local.run_with_cache(clean, names_filter=lambda n: n.endswith("resid_pre"))
    with ServerProcess(args.model) as server:
        hookwire.configure(url=server.url)
        remote = htl.RemoteModel(args.model)
        serial = sweep(remote, clean_cache, corrupt, blocking=True)   # warm-up and reference
        piped = sweep(remote, clean_cache, corrupt, blocking=False)
        torch.testing.assert_close(piped, serial, rtol=1e-5, atol=1e-5)
        layer = local.cfg.n_layers // 2
        name = f"blocks.{layer}.hook_resid_pre"

        def patch(act, hook):
            act[:, 5] = clean_cache[name][:, 5]
            return act
        torch.testing.assert_close(
            serial[layer * args.seq + 5],
            local.run_with_hooks(corrupt, fwd_hooks=[(name, patch)])[0, -1],
            rtol=1e-5, atol=1e-5)
        times = {"call_by_call": [], "pipelined": []}
        for _ in range(args.repeats):   # interleaved, so drift hits both
            for kind, blocking in (("call_by_call", True), ("pipelined", False)):
                t0 = time.perf_counter()
                sweep(remote, clean_cache, corrupt, blocking=blocking)
                times[kind].append(time.perf_counter() - t0)
        hookwire.client.close_connections()
    med = {k: statistics.median(v) for k, v in times.items()}
    result = {"model": args.model, "calls": local.cfg.n_layers * args.seq,
              "seconds": times, "median_s": med,
              "speedup_pipelined": med["call_by_call"] / med["pipelined"]}
    print(json.dumps(result, indent=2))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=2)


if __name__ == "__main__":
    main()
