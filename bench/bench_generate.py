"""Generation with interventions: tokens per second, remote (server's KV cache, tokens
streamed) vs local (the same loop and hooks on a local copy with the same weights), on
gpt2-small-random. Ratios are taken in one run; the server runs in its own process.

Cases: no hooks; a steering hook on one block at every step (intervene_on="all"); the same
plus a per-step cache of that block's output (one tensor back per token).

    python bench/bench_generate.py [--tokens 32] [--prompt 16] [--repeats 3] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

import hookwire
import hookwire.hf as hhf
from hookwire.families import build_hf_model
from hookwire.server.models import BUILTIN_MODELS

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from server_proc import ServerProcess  # noqa: E402

MODEL = "gpt2-small-random"
BLOCK = "transformer.h.6"


def alternating_medians(fns, repeats: int) -> list[float]:
    """Median time of each function, runs interleaved (a, b, a, b, ...) so that load from
    other processes on a shared machine hits both alike."""
    for fn in fns:
        fn()  # warm-up
    times = [[] for _ in fns]
    for _ in range(repeats):
        for fn, out in zip(fns, times):
            t0 = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t0)
    return [statistics.median(t) for t in times]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--prompt", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--json")
    args = ap.parse_args()
    torch.set_num_threads(1)  # 2 shared cores: the server process has its own
    spec = BUILTIN_MODELS[MODEL]
    local = hhf.LocalModel(build_hf_model(spec.architecture, spec.config, seed=spec.seed)[0])
    prompt = torch.randint(0, 50000, (1, args.prompt),
                           generator=torch.Generator().manual_seed(0))
    vector = torch.randn(768, generator=torch.Generator().manual_seed(1))

    def steer(module, args_, output):
        return output + 2.0 * vector
    cases = {"no hooks": {}, "steer every step": {"hooks": {BLOCK: steer},
                                                  "intervene_on": "all"},
             "steer + cache per step": {"hooks": {BLOCK: steer}, "intervene_on": "all",
                                        "modules": [BLOCK]}}
    results = {}
    # The server process gets one thread too (inherited): the ratio compares like with like.
    os.environ["OMP_NUM_THREADS"] = "1"
    with ServerProcess(MODEL) as server:
        hookwire.configure(url=server.url)
        remote = hhf.RemoteModel(MODEL)
        for label, kw in cases.items():
            r = remote.generate(prompt, args.tokens, **kw)
            l_ = local.generate(prompt, args.tokens, **kw)
            assert torch.equal(r.sequences, l_.sequences), label  # remote == local
            t_local, t_remote = alternating_medians(
                [lambda: local.generate(prompt, args.tokens, **kw),
                 lambda: remote.generate(prompt, args.tokens, **kw)], args.repeats)
            results[label] = {"local_tok_s": args.tokens / t_local,
                              "remote_tok_s": args.tokens / t_remote,
                              "remote_over_local_time": t_remote / t_local}
            print(f"{label:24s} local {args.tokens / t_local:7.1f} tok/s  remote "
                  f"{args.tokens / t_remote:7.1f} tok/s  time ratio remote/local "
                  f"{t_remote / t_local:.3f}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": MODEL, "tokens": args.tokens, "prompt": args.prompt,
                       "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
