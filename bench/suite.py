"""The side-by-side benchmark suite: every workload of ``bench/workloads.py`` on each model
and batch size, in every column (plain forward, local TransformerLens, local pyvene, local
NNsight, hookwire remote over loopback, hookwire remote with N concurrent clients), plus the
client's memory in a remote run. One process tree: this process (the single client, and the
local tools), a server process (``server_proc.py``), N client processes, one memory probe.

    .venv/bin/python -m bench.suite [--quick] [--out DIR] [--repeats 10]

Writes DIR/report.json and DIR/report.md (default DIR: bench/results). Every column's result is
checked equal (``assert_close``) to the local reference before it is timed. Timing: warm-up
rounds, then rounds in which every column runs once, interleaved (so load from other processes
falls on all alike); the median, min and max per column. Ratios are medians of the same run.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from bench.clients import ConcurrentClients
from bench.report import markdown
from bench.server_proc import ServerProcess
from bench.workloads import WORKLOADS, Tools, make_inputs

COLUMNS = ("plain", "tl", "pyvene", "nnsight", "remote", "nnsight_remote")
ROOT = Path(__file__).resolve().parent.parent


def build_tools(model: str, batch: int, local: dict) -> Tools:
    import hookwire.nnsight as hnn
    import hookwire.pyvene as hpv
    import hookwire.transformerlens as htl

    if not local:   # the local copies of the served weights, built once per model
        import nnsight

        from hookwire.families import build_hf_model
        from hookwire.server.models import BUILTIN_MODELS, load_model
        spec = BUILTIN_MODELS[model]

        def hf():   # same config and seed as the server's: the same weights
            return build_hf_model(spec.architecture, spec.config, seed=spec.seed)[0].eval()
        local.update(hf=hf(), bridge=load_model(model).bridge, pv_hf=hf(),
                     nn=nnsight.NNsight(hf()), remote=htl.RemoteModel(model),
                     nn_remote=hnn.RemoteLanguageModel(model))
    cfg = local["bridge"].cfg
    inputs = make_inputs(cfg.n_layers, cfg.n_heads, cfg.d_model, batch)
    return Tools(inputs, hf=local["hf"], bridge=local["bridge"], pv_hf=local["pv_hf"],
                 nn=local["nn"], remote=local["remote"], nn_remote=local["nn_remote"],
                 remote_pv=lambda c: hpv.RemoteIntervenableModel(c, model))


def _flat(result):
    if result is None or isinstance(result, torch.Tensor):
        return [result]
    return [x for r in result for x in _flat(r)]


def check_equal(workload, tools: Tools) -> list[str]:
    """Run every column once on the same call (round 0) and compare it with the reference."""
    tools.state["round"] = 0
    ref = _flat(workload.columns[workload.compare_to](tools))
    checked = []
    for col, fn in workload.columns.items():
        if col in ("plain", workload.compare_to):
            continue
        got = _flat(fn(tools))
        assert len(got) == len(ref), (workload.name, col)
        for g, r in zip(got, ref):
            if g is not None and r is not None:
                torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-5,
                                           msg=lambda m: f"{workload.name} {col}: {m}")
        checked.append(col)
    return checked


def time_columns(workload, tools: Tools, rounds: int, warmup: int) -> dict:
    times = {col: [] for col in workload.columns}
    for r in range(-warmup, rounds):
        tools.state["round"] = max(r, 0)
        for col, fn in workload.columns.items():
            t0 = time.perf_counter()
            fn(tools)
            if r >= 0:
                times[col].append(time.perf_counter() - t0)
    return {col: {"median": statistics.median(t), "min": min(t), "max": max(t), "n": len(t)}
            for col, t in times.items()}


def client_memory(url: str, model: str) -> dict:
    proc = subprocess.run([sys.executable, "-m", "bench.client_memory", url, model],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise RuntimeError(f"client memory probe failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def machine() -> dict:
    info = {"python": platform.python_version(), "platform": platform.platform(),
            "cpus": os.cpu_count(), "torch": torch.__version__}
    try:
        with open("/proc/cpuinfo") as fh:
            info["cpu"] = next(l.split(":", 1)[1].strip() for l in fh if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    from importlib.metadata import version
    for dist in ("transformer-lens", "pyvene", "nnsight", "transformers"):
        info[dist] = version(dist)
    info["load_avg_at_start"] = os.getloadavg()
    return info


def write_report(report: dict, out: Path):
    report["seconds"] = time.time() - report["started"]
    (out / "report.json").write_text(json.dumps(report, indent=2))
    (out / "report.md").write_text(markdown(report))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true",
                    help="tiny-gpt2 only, batches 1 and 2, 3 rounds: a smoke run (~2 min)")
    ap.add_argument("--models", default="tiny-gpt2,gpt2-small-random")
    ap.add_argument("--batches", default="1,4")
    ap.add_argument("--repeats", type=int, default=10, help="timed rounds (>= 10 for figures)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--client-reps", type=int, default=2,
                    help="units each concurrent client runs after warm-up")
    ap.add_argument("--workloads", default=",".join(w.name for w in WORKLOADS))
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = ap.parse_args(argv)
    if args.quick:
        args.models, args.batches, args.repeats, args.warmup, args.client_reps = \
            "tiny-gpt2", "1,2", 3, 1, 1
    models, batches = args.models.split(","), [int(b) for b in args.batches.split(",")]
    workloads = [w for w in WORKLOADS if w.name in args.workloads.split(",")]
    # Single-threaded like the concurrent clients: with the server busy on the other core,
    # two OpenMP threads per process are several times slower here, not faster.
    torch.set_num_threads(1)

    import hookwire
    from hookwire.client import close_connections

    report = {"machine": machine(), "args": vars(args), "started": time.time(), "rows": []}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with ServerProcess(*models) as server, ConcurrentClients(server.url, args.clients) as pool:
        hookwire.configure(url=server.url)
        for model in models:
            local: dict = {}
            for batch in batches:
                for workload in workloads:
                    tools = build_tools(model, batch, local)
                    t0 = time.perf_counter()
                    with torch.set_grad_enabled(workload.grad):
                        if workload.setup is not None:
                            workload.setup(tools)
                        checked = check_equal(workload, tools)
                        calls = workload.calls(tools.inputs)
                        # a sweep's unit is one call: time each call of it at least once
                        rounds = max(args.repeats, calls if calls > 1 else 0)
                        timings = time_columns(workload, tools, rounds, args.warmup)
                    conc = pool.run(model, batch, workload.name, args.client_reps)
                    row = {"model": model, "batch": batch, "seq": tools.inputs.clean.shape[1],
                           "workload": workload.name, "title": workload.title,
                           "unit": workload.unit, "calls": calls, "checked_equal": checked,
                           "ratio_to": workload.ratio_to, "times_s": timings,
                           "concurrent": conc,
                           "remote_ratio": timings["remote"]["median"]
                           / timings[workload.ratio_to]["median"],
                           # NNsight code on hookwire / the same code in local NNsight
                           "nnsight_ratio": timings["nnsight_remote"]["median"]
                           / timings["nnsight"]["median"]
                           if "nnsight_remote" in timings else None,
                           "wall_s": time.perf_counter() - t0}
                    report["rows"].append(row)
                    write_report(report, out)   # after every row: a cut-short run keeps its rows
                    print(f"{model:18s} b={batch} {workload.name:14s} "
                          + "  ".join(f"{c} {v['median']*1e3:8.1f}ms"
                                      for c, v in timings.items())
                          + f"  | {args.clients} clients p50 "
                          f"{conc['latency_s']['median']*1e3:.1f}ms "
                          f"{conc['units_per_s']:.2f}/s  ({row['wall_s']:.0f}s)", flush=True)
            local.clear()
        report["memory"] = client_memory(server.url, models[-1])
        close_connections()
    write_report(report, out)
    print(markdown(report))
    print(f"wrote {out / 'report.json'} and {out / 'report.md'} in {report['seconds']:.0f} s")


if __name__ == "__main__":
    main()
