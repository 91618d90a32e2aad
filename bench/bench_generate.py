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
    ap.add_argument("--device", default="cpu", help="server and local model (e.g. cuda:0)")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--model", default=MODEL, help="a built-in model (tiny-gpt2: a quick check)")
    args = ap.parse_args()
    torch.set_num_threads(1)  # 2 shared cores: the server process has its own
    spec = BUILTIN_MODELS[args.model]
    hidden = spec.config["n_embd"]
    block = f"transformer.h.{spec.config['n_layer'] // 2}"   # h.6 on gpt2-small-random
    local = hhf.LocalModel(build_hf_model(spec.architecture, spec.config, seed=spec.seed,
                                          dtype=getattr(torch, args.dtype))[0].to(args.device))
    prompt = torch.randint(0, spec.config["vocab_size"] - 1, (1, args.prompt),
                           generator=torch.Generator().manual_seed(0))
    vector = torch.randn(hidden, generator=torch.Generator().manual_seed(1)).to(
        getattr(torch, args.dtype))

    def cases(vector):
        """The workloads, with the steering vector where the model is (local: the device)."""
        def steer(module, args_, output):
            return output + 2.0 * vector
        return {"no hooks": {}, "steer every step": {"hooks": {block: steer},
                                                     "intervene_on": "all"},
                "steer + cache per step": {"hooks": {block: steer}, "intervene_on": "all",
                                           "modules": [block]}}
    remote_cases, local_cases = cases(vector), cases(vector.to(args.device))
    results = {}
    # The server process gets one thread too (inherited): the ratio compares like with like.
    os.environ["OMP_NUM_THREADS"] = "1"
    with ServerProcess(args.model, device=args.device, dtype=args.dtype) as server:
        hookwire.configure(url=server.url)
        remote = hhf.RemoteModel(args.model)
        for label, kw in remote_cases.items():
            local_kw = local_cases[label]
            r = remote.generate(prompt, args.tokens, **kw)
            l_ = local.generate(prompt, args.tokens, **local_kw)
            assert torch.equal(r.sequences, l_.sequences.cpu()), label  # remote == local
            t_local, t_remote = alternating_medians(
                [lambda: local.generate(prompt, args.tokens, **local_kw),
                 lambda: remote.generate(prompt, args.tokens, **kw)], args.repeats)
            results[label] = {"device": args.device, "dtype": args.dtype,
                              "local_tok_s": args.tokens / t_local,
                              "remote_tok_s": args.tokens / t_remote,
                              "remote_over_local_time": t_remote / t_local}
            print(f"{label:24s} local {args.tokens / t_local:7.1f} tok/s  remote "
                  f"{args.tokens / t_remote:7.1f} tok/s  time ratio remote/local "
                  f"{t_remote / t_local:.3f}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": args.model, "tokens": args.tokens, "prompt": args.prompt,
                       "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
