"""Issue 5 bench: results stream while the forward runs. Time from submitting a request to
having its layer-0 save in hand, over time to ``done``, on ``gpt2-small-random`` (goal
<= 0.25): a TL ``run_with_hooks(remote=True, blocking=False)`` that stores
``blocks.0.hook_resid_post`` in a dict and returns the logits.

    .venv/bin/python bench/bench_streaming.py [--batch 8] [--seq 64] [--repeats 10]
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
import hookwire.transformerlens as htl
from hookwire.runs import SavedValue

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from server_proc import ServerProcess  # noqa: E402

MODEL = "gpt2-small-random"


def one_run(model, tokens):
    store = {}

    def keep(act, hook):
        store["resid0"] = act.detach()
    t0 = time.perf_counter()
    run = model.run_with_hooks(tokens, fwd_hooks=[("blocks.0.hook_resid_post", keep)],
                               blocking=False, progress=False)
    first = done = None
    for event in run.events():
        now = time.perf_counter() - t0
        if isinstance(event, SavedValue) and first is None and \
                isinstance(store.get("resid0"), torch.Tensor) and \
                type(store["resid0"]) is torch.Tensor:
            first = now
    logits = run.result()
    done = time.perf_counter() - t0  # the events end when the request is done
    assert logits.shape[-1] == model.cfg.d_vocab and first is not None and done is not None
    return first, done


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=10)
    args = ap.parse_args()
    with ServerProcess(MODEL) as srv:
        hookwire.configure(url=srv.url)
        model = htl.RemoteModel(MODEL)
        tokens = torch.randint(0, model.cfg.d_vocab, (args.batch, args.seq),
                               generator=torch.Generator().manual_seed(0))
        for _ in range(2):
            one_run(model, tokens)
        runs = [one_run(model, tokens) for _ in range(args.repeats)]
    ratios = sorted(f / d for f, d in runs)
    print(json.dumps({
        "model": MODEL, "batch": args.batch, "seq": args.seq, "repeats": args.repeats,
        "first_result_s_median": statistics.median(f for f, _ in runs),
        "done_s_median": statistics.median(d for _, d in runs),
        "first_over_done_median": statistics.median(ratios),
        "first_over_done_min": ratios[0], "first_over_done_max": ratios[-1]}, indent=2))


if __name__ == "__main__":
    main()
