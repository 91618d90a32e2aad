"""The suite's Markdown report: one table row per (model, batch, workload)."""
from __future__ import annotations

HEADER = ("| model | batch | workload (unit) | plain fwd | local TL | local pyvene | local NNsight "
          "| hookwire remote | remote / local | NNsight code on hookwire | / local NNsight "
          "| {n} clients: latency p50 | {n} clients: units/s (x 1 client) |")


def _ms(t: dict | None) -> str:
    if t is None:
        return "—"
    return f"{t['median']*1e3:.1f} ({t['min']*1e3:.1f}–{t['max']*1e3:.1f})"


def _ratio(x) -> str:
    return "—" if x is None else f"{x:.2f} x"


def _mib(b: int) -> str:
    return f"{b / 2**20:.1f} MiB"


def markdown(report: dict) -> str:
    rows = report["rows"]
    n = rows[0]["concurrent"]["clients"] if rows else 8
    lines = [HEADER.format(n=n), "|" + "---|" * 13]
    for r in rows:
        t = r["times_s"]
        conc = r["concurrent"]
        single = 1.0 / t["remote"]["median"]
        ref = {"tl": "TL", "pyvene": "pyvene"}[r["ratio_to"]]
        lines.append(
            f"| {r['model']} | {r['batch']} | {r['workload']} ({r['unit']}; {r['calls']} in "
            f"all) | {_ms(t.get('plain'))} | {_ms(t.get('tl'))} | {_ms(t.get('pyvene'))} "
            f"| {_ms(t.get('nnsight'))} | {_ms(t['remote'])} | {r['remote_ratio']:.2f} x {ref} "
            f"| {_ms(t.get('nnsight_remote'))} | {_ratio(r.get('nnsight_ratio'))} "
            f"| {_ms(conc['latency_s'])} | {conc['units_per_s']:.2f} "
            f"({conc['units_per_s'] / single:.2f}) |")
    m = report.get("machine", {})
    a = report.get("args", {})
    notes = [
        "",
        "Times in ms per unit: median (min–max) of "
        f"{a.get('repeats')} or more timed rounds after {a.get('warmup')} warm-up rounds, all "
        "columns interleaved round by round in one process (torch single-threaded), the "
        "server in its own process on 127.0.0.1. `remote / local` divides the medians of the "
        "same run. A sweep's unit is one call; every call of the sweep is timed at least once. "
        f"Prompts of {rows[0]['seq'] if rows else '?'} tokens. `plain fwd` is the same number "
        "of plain HF forward (and backward) passes with no hook. Concurrent clients: "
        f"{n} processes started together, {a.get('client_reps')} units each after a warm-up; "
        "units/s is aggregate, `x 1 client` divides it by the single client's rate. Every "
        "column was checked equal to the reference (`assert_close`) before timing.",
    ]
    mem = report.get("memory")
    if mem:
        notes += [
            "",
            f"Client memory ({mem['model']}, fresh process): after a remote TL run_with_cache "
            f"and a remote pyvene interchange, RSS grew by {_mib(mem['remote']['rss_growth_bytes'])} "
            f"over the imports ({_mib(mem['rss_after_imports'])}); the stand-ins hold "
            f"{mem['remote']['tl_stand_in_param_bytes']} B (TL) and "
            f"{mem['remote']['pyvene_stand_in_param_bytes']} B (pyvene) of parameters "
            f"(meta device). Building the model locally adds {_mib(mem['local']['rss_growth_bytes'])} "
            f"RSS and {_mib(mem['local']['param_bytes'])} of parameters.",
        ]
    if m:
        notes += ["", f"Machine: {m.get('cpus')} CPUs ({m.get('cpu', '?')}), "
                  f"{m.get('platform')}, Python {m.get('python')}, torch {m.get('torch')}, "
                  f"transformer-lens {m.get('transformer-lens')}, pyvene {m.get('pyvene')}, "
                  f"nnsight {m.get('nnsight')}, transformers {m.get('transformers')}; load "
                  f"average at start {', '.join(f'{x:.2f}' for x in m['load_avg_at_start'])}; "
                  f"suite wall time {report.get('seconds', 0):.0f} s."]
    return "\n".join(lines + notes) + "\n"
