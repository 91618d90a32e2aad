"""Remote vs local pyvene: a vanilla interchange on gpt2-small-random, batch 8 x 64 tokens.

Local: ``pv.IntervenableModel`` on a plain HF model with the served weights (pyvene runs the
source forward, then the base forward). Remote: ``hookwire.pyvene.RemoteIntervenableModel``
against a server in its own process on 127.0.0.1 (one batched forward of base + source rows,
logits of the base rows sent back). Both measured in the same run, interleaved, median of
``--repeats`` after warm-up; the ratio remote/local is the figure (goal <= 0.65).

    python bench/bench_pyvene_remote.py [--repeats 10] [--layer 6] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

import hookwire
import hookwire.pyvene as hpv
from hookwire.families import build_hf_model
from hookwire.server.models import BUILTIN_MODELS

import pyvene as pv

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from server_proc import ServerProcess  # noqa: E402

MODEL = "gpt2-small-random"


def paired_medians(fns, repeats: int, warmup: int = 2) -> list[float]:
    """Median time of each function, the runs interleaved (a, b, a, b, ...) so that load from
    other processes on a shared machine falls on both alike."""
    for _ in range(warmup):
        for fn in fns:
            fn()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for k, fn in enumerate(fns):
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return [statistics.median(t) for t in times]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--layer", type=int, default=6)
    ap.add_argument("--component", default="block_output")
    ap.add_argument("--json")
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    spec = BUILTIN_MODELS[MODEL]
    hf_model, _ = build_hf_model(spec.architecture, spec.config, seed=spec.seed)
    gen = torch.Generator().manual_seed(0)
    base = {"input_ids": torch.randint(0, 50257, (8, 64), generator=gen)}
    source = {"input_ids": torch.randint(0, 50257, (8, 64), generator=gen)}

    def config():
        return pv.IntervenableConfig([{"layer": args.layer, "component": args.component,
                                       "intervention_type": pv.VanillaIntervention}])
    with ServerProcess(MODEL) as server:
        hookwire.configure(url=server.url)
        local = pv.IntervenableModel(config(), hf_model)  # pyvene owns this copy: not served
        remote = hpv.RemoteIntervenableModel(config(), MODEL)

        def run(model, **kwargs):
            return model(base, [source], {"sources->base": 17}, **kwargs)[1].logits
        torch.testing.assert_close(run(remote), run(local))
        # pyvene's default call also builds the base run's KV cache (HF's use_cache default);
        # the remote forward never does (its outputs carry no past_key_values). The second
        # local figure turns that off for the base run, as pyvene's use_cache=False does.
        t_local, t_local_nc, t_remote = paired_medians(
            [lambda: run(local), lambda: run(local, use_cache=False), lambda: run(remote)],
            args.repeats)
    ratio, ratio_nc = t_remote / t_local, t_remote / t_local_nc
    print(f"vanilla interchange, layer {args.layer} {args.component}, batch 8 x 64: "
          f"local pyvene {t_local*1e3:.1f} ms (use_cache=False: {t_local_nc*1e3:.1f} ms), "
          f"remote {t_remote*1e3:.1f} ms, ratio {ratio:.3f} (goal <= 0.65; vs use_cache=False "
          f"{ratio_nc:.3f})", flush=True)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"local_s": t_local, "local_no_cache_s": t_local_nc,
                       "remote_s": t_remote, "ratio": ratio, "ratio_vs_no_cache": ratio_nc,
                       "layer": args.layer, "component": args.component}, fh, indent=2)


if __name__ == "__main__":
    main()
