"""Issue 3 bench: bytes a residual-stream activation-patching sweep uploads, with the clean
cache referred to on the server (residents on) against re-sent on every call (off).

One server subprocess on 127.0.0.1 hosting ``gpt2-small-random``; a weightless RemoteModel
stand-in; one clean ``run_with_cache``, then every (layer, position) patched into the
corrupted run twice -- residents on, then off -- with the two sweeps' results checked equal.
Reported: tensor bytes uploaded, all bytes sent (JSON included), and wall time per call.

    .venv/bin/python bench/bench_residents.py [--model gpt2-small-random] [--seq 32]
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time

import torch

import hookwire
import hookwire.transformerlens as htl
from hookwire.client import get_connection

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from server_proc import ServerProcess  # noqa: E402


def patch_resid(resid, hook, pos, clean_resid):
    resid[:, pos, :] = clean_resid[:, pos, :]


def sweep(model, cache, corrupt):
    out = torch.empty(model.cfg.n_layers, corrupt.shape[1], model.cfg.d_vocab)
    for layer in range(model.cfg.n_layers):
        name = f"blocks.{layer}.hook_resid_pre"
        for pos in range(corrupt.shape[1]):
            hook = functools.partial(patch_resid, pos=pos, clean_resid=cache[name])
            logits = model.run_with_hooks(corrupt, fwd_hooks=[(name, hook)], progress=False)
            out[layer, pos] = logits[0, -1]
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="gpt2-small-random")
    ap.add_argument("--seq", type=int, default=32)
    args = ap.parse_args()
    with ServerProcess(args.model) as srv:
        hookwire.configure(url=srv.url)
        model = htl.RemoteModel(args.model)
        gen = torch.Generator().manual_seed(0)
        clean = torch.randint(0, model.cfg.d_vocab, (1, args.seq), generator=gen)
        corrupt = clean.clone()
        corrupt[0, args.seq // 2] = (clean[0, args.seq // 2] + 1) % model.cfg.d_vocab
        conn = get_connection()
        figures = {}
        results = {}
        for mode in ("on", "off"):
            conn.use_residents = mode == "on"
            _, cache = model.run_with_cache(clean, names_filter=lambda n: n.endswith(
                "hook_resid_pre"), progress=False)
            start = (conn.stats.tensor_bytes_sent, conn.stats.bytes_sent, conn.stats.requests)
            t0 = time.perf_counter()
            results[mode] = sweep(model, cache, corrupt)
            elapsed = time.perf_counter() - t0
            calls = conn.stats.requests - start[2]
            figures[mode] = {"calls": calls,
                             "tensor_bytes_uploaded": conn.stats.tensor_bytes_sent - start[0],
                             "bytes_sent": conn.stats.bytes_sent - start[1],
                             "s_per_call": elapsed / calls}
        torch.testing.assert_close(results["on"], results["off"], rtol=0, atol=0)
        on, off = figures["on"], figures["off"]
        report = {
            "model": args.model, "seq": args.seq, "layers": model.cfg.n_layers,
            "on": on, "off": off,
            "tensor_upload_ratio": on["tensor_bytes_uploaded"] / off["tensor_bytes_uploaded"],
            "all_bytes_sent_ratio": on["bytes_sent"] / off["bytes_sent"],
            "time_per_call_ratio": on["s_per_call"] / off["s_per_call"],
        }
        print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
