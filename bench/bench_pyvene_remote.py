"""Remote vs local pyvene: a vanilla interchange on gpt2-small-random, batch 8 x 64 tokens.

Local: ``pv.IntervenableModel`` on a plain HF model with the served weights (pyvene runs the
source forward, then the base forward). Remote: ``hookwire.pyvene.RemoteIntervenableModel``
against a server in its own process on 127.0.0.1 (one batched forward of base + source rows,
logits of the base rows sent back). Both measured in the same run, interleaved, median of
``--repeats`` after warm-up; the ratio remote/local is the figure (goal <= 0.65).

    python bench/bench_pyvene_remote.py [--repeats 10] [--layers 0,6,11] [--padded]
                                        [--attn eager|sdpa] [--json out.json]

``--padded``: base and source come with an attention mask (as a tokenizer pads a batch: the
last two rows of each have 16 padding positions on the left); ``--attn``: the served and local
model's attention implementation (pyvene's own ``create_gpt2_lm`` loads GPT-2 with eager).
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
    ap.add_argument("--layers", default="0,6,11", help="intervened layers, comma-separated")
    ap.add_argument("--component", default="block_output")
    ap.add_argument("--padded", action="store_true", help="inputs with left padding")
    ap.add_argument("--attn", default=None, help="attention implementation (default: HF's)")
    ap.add_argument("--json")
    ap.add_argument("--device", default="cpu", help="server and local model (e.g. cuda:0)")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--model", default=MODEL, help="a built-in model (tiny-gpt2: a quick check)")
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    spec = BUILTIN_MODELS[args.model]
    vocab = spec.config["vocab_size"]
    hf_model, _ = build_hf_model(spec.architecture, spec.config, seed=spec.seed,
                                 dtype=getattr(torch, args.dtype))
    hf_model = hf_model.to(args.device)
    gen = torch.Generator().manual_seed(0)
    base = {"input_ids": torch.randint(0, vocab, (8, 64), generator=gen)}
    source = {"input_ids": torch.randint(0, vocab, (8, 64), generator=gen)}
    if args.padded:
        mask = torch.ones(8, 64, dtype=torch.int64)
        mask[6:, :16] = 0
        base["attention_mask"], source["attention_mask"] = mask, mask.clone()
    if args.attn:
        hf_model.set_attn_implementation(args.attn)
    local_inputs = tuple({k: v.to(args.device) for k, v in x.items()} for x in (base, source))
    results = {"device": args.device, "dtype": args.dtype}
    with ServerProcess(args.model, device=args.device, dtype=args.dtype,
                       attn=args.attn) as server:
        hookwire.configure(url=server.url)
        for layer in [int(x) for x in args.layers.split(",")]:
            def config():
                return pv.IntervenableConfig([{"layer": layer, "component": args.component,
                                               "intervention_type": pv.VanillaIntervention}])
            local = pv.IntervenableModel(config(), hf_model)  # pyvene owns it: never served
            remote = hpv.RemoteIntervenableModel(config(), args.model)

            def run(model):
                b, s = (base, source) if model is remote else local_inputs
                out = model(b, [s], {"sources->base": 17})[1].logits
                if model is not remote and args.device != "cpu":
                    torch.cuda.synchronize()
                return out.cpu()
            real = base["attention_mask"].bool() if args.padded else slice(None)
            torch.testing.assert_close(run(remote)[real], run(local)[real])
            t_local, t_remote = paired_medians([lambda: run(local), lambda: run(remote)],
                                               args.repeats)
            ratio = t_remote / t_local
            results[f"layer_{layer}"] = {"local_s": t_local, "remote_s": t_remote,
                                         "ratio": ratio}
            # The source rows run up to the intervened block only (then the batch is
            # narrowed to the base rows), so the ratio grows with the layer.
            print(f"vanilla interchange, layer {layer:2d} {args.component}, batch 8 x 64"
                  f"{' padded' if args.padded else ''}{', ' + args.attn if args.attn else ''}: "
                  f"local pyvene {t_local*1e3:8.1f} ms, remote {t_remote*1e3:8.1f} ms, "
                  f"ratio {ratio:.3f} (goal <= 0.65)", flush=True)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=2)


if __name__ == "__main__":
    main()
