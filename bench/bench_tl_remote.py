"""Remote vs local ``run_with_hooks`` on gpt2-small-random, batch 8 x 128 tokens, and the
client's trace+encode time for 48 hooks. Ratios are taken in one run (machines are noisy).

    python bench/bench_tl_remote.py [--repeats 10] [--json out.json] [--device cuda:0]
                                    [--dtype bfloat16]

With ``--device``/``--dtype`` the server and the local model both run there (what
scripts/gpu_check.sh measures on a GPU).
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
from hookwire.transformerlens.remote_run import build_request, trace_hook_points
from hookwire.trace import Tracer

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from server_proc import ServerProcess  # noqa: E402

MODEL = "gpt2-small-random"


def ablate_head(z, hook):
    z[:, :, 3, :] = 0.0


def median_time(fn, repeats: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--json")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--model", default=MODEL, help="a built-in model (tiny-gpt2: a quick check)")
    ap.add_argument("--dtype", default="float32")
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    model_name = args.model
    local = load_model(model_name, dtype=args.dtype, device=args.device).bridge
    n_layers, mid = local.cfg.n_layers, local.cfg.n_layers // 3
    tokens = torch.randint(0, 256, (8, 128), generator=torch.Generator().manual_seed(0))
    results = {"device": args.device, "dtype": args.dtype}
    with ServerProcess(model_name, device=args.device, dtype=args.dtype) as server:
        hookwire.configure(url=server.url)
        remote = htl.RemoteModel(model_name)
        for return_type in ("logits", None):
            def run(model):
                cache = {}

                def store(act, hook):
                    cache[hook.name] = act.detach()
                fwd = [(f"blocks.{mid}.attn.hook_z", ablate_head),
                       (lambda n: n.endswith("hook_resid_post"), store)]
                out = model.run_with_hooks(tokens if model is remote else
                                           tokens.to(args.device), fwd_hooks=fwd,
                                           return_type=return_type)
                if model is not remote and args.device != "cpu":
                    torch.cuda.synchronize()  # the local time includes the GPU's work
                return out, cache
            r_out, r_cache = run(remote)
            l_out, l_cache = run(local)
            if return_type is not None:
                torch.testing.assert_close(r_out, l_out.cpu())
            for k in l_cache:
                torch.testing.assert_close(r_cache[k], l_cache[k].cpu())
            t_local = median_time(lambda: run(local), args.repeats)
            t_remote = median_time(lambda: run(remote), args.repeats)
            key = f"return_type={return_type}"
            results[key] = {"local_s": t_local, "remote_s": t_remote,
                            "ratio": t_remote / t_local}
            print(f"{key:22s} local {t_local*1e3:8.1f} ms  remote {t_remote*1e3:8.1f} ms  "
                  f"ratio {t_remote/t_local:.3f}  (goal <= 1.10)", flush=True)

        # Trace + encode: 4 hooks per layer (48 on gpt2-small's 12 layers), no network.
        info = hookwire.client.get_connection(server.url).model_info(model_name)
        names = []
        for layer in range(n_layers):
            names += [f"blocks.{layer}.attn.hook_z", f"blocks.{layer}.hook_resid_pre",
                      f"blocks.{layer}.mlp.hook_post", f"blocks.{layer}.hook_resid_post"]
        fwd = [(n, ablate_head if "hook_z" in n else (lambda a, hook: a * 0.9)) for n in names]

        def trace_encode():
            tracer = Tracer()
            with remote.hooks(fwd_hooks=fwd):
                trace_hook_points(remote, info, 8, 128, tracer)
            graph, _ = build_request(tracer, model_name, tokens, "logits", False)
            return json.dumps(graph)
        def tl_registration_only():
            with remote.hooks(fwd_hooks=fwd):
                pass
        t_trace = median_time(trace_encode, max(args.repeats, 30), warmup=3)
        t_tl = median_time(tl_registration_only, max(args.repeats, 30), warmup=3)
        results[f"trace_encode_{len(names)}_hooks_ms"] = (t_trace - t_tl) * 1e3
        results["tl_hook_registration_ms"] = t_tl * 1e3
        print(f"trace+encode {len(names)} hooks   {(t_trace - t_tl)*1e3:.2f} ms  (goal <= 5 ms; plus "
              f"{t_tl*1e3:.2f} ms TL's own hooks() registration, paid locally too)")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=2)


if __name__ == "__main__":
    main()
