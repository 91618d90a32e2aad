"""Per-call overhead on a small model: tiny-gpt2, batch 1, 16 tokens (issue 18).

Two calls, each remote (``RemoteModel``, server in its own process on 127.0.0.1) and with
local TL 4 (``TransformerBridge``, same weights), interleaved round by round in one process:

* ``ablation``: ``run_with_hooks`` with one hook zeroing a head of the middle layer's
  ``hook_z``, logits returned (the head cycles through the layer's heads across rounds);
* ``ablation_metric``: the same, with ``metric=`` (the logit difference comes back, as in
  ``bench.suite``'s head_ablation);
* ``cache_all``: ``run_with_cache`` of every ``hook_resid_post``, logits returned;
* ``ablate_then_cache``: the same cache inside a ``hooks()`` context that zeroes a head in
  place (the everyday "ablate, then inspect the cache"): the server holds the caches made
  before the in-place edit until it has run (hookwire.held_saves).

Remote and local results are checked equal before timing. Ratios are remote / local medians
of the same run; both processes run torch single-threaded.

    python bench/bench_overhead.py [--rounds 40] [--model tiny-gpt2] [--json out.json]
    python bench/bench_overhead.py --in-process       # the server in a thread of this process
    python bench/bench_overhead.py --profile client   # cProfile of the remote ablation calls

Each remote call's time is also split (``breakdown`` in the report, medians in ms): the
client before its request is sent (tracing the hooks, TL's own hook bookkeeping), the
server's own timings (queued, validating, executing: the forward with the graph's nodes and
sending the results), the rest of ``Connection.run`` (encoding and sending the request, the
front receiving and admitting it, the hand-offs between the server's threads, the results'
transfer and decoding), and the client after the answer (putting values in place, TL's
clean-up).
"""
from __future__ import annotations

import argparse
import cProfile
import functools
import json
import pstats
import statistics
import sys
import time

import torch

import hookwire
import hookwire.transformerlens as htl
from hookwire.server.models import load_model

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from server_proc import ServerProcess  # noqa: E402

ANSWER, WRONG = 5, 7


class CallClock:
    """Stamps ``hookwire.client.Connection.run`` of the calls made while it is armed: when
    each call entered and left it, and the server's timings of its request."""

    def __init__(self):
        self.runs: list = []
        self._run = hookwire.client.Connection.run
        clock = self

        def run(conn, *args, **kwargs):
            t0 = time.perf_counter()
            result = clock._run(conn, *args, **kwargs)
            clock.runs.append((t0, time.perf_counter(), result.timings))
            return result
        hookwire.client.Connection.run = run

    def close(self):
        hookwire.client.Connection.run = self._run

    def split(self, t_call: float, t_end: float) -> dict:
        """The last call's parts (ms), given when it was made and when it returned."""
        t0, t1, server = self.runs[-1]
        parts = {"client_before": t0 - t_call}
        parts.update({k: server.get(k, 0.0) for k in ("queued_s", "validate_s", "execute_s")})
        parts["wire_and_front"] = (t1 - t0) - sum(server.get(k, 0.0) for k in
                                                  ("queued_s", "validate_s", "execute_s"))
        parts["client_after"] = t_end - t1
        return {k.removesuffix("_s"): v * 1e3 for k, v in parts.items()}


def logit_diff(logits):
    return logits[:, -1, ANSWER] - logits[:, -1, WRONG]


def zero_head(z, hook, head):
    z[:, :, head, :] = 0.0


def is_resid_post(name: str) -> bool:
    return name.endswith("hook_resid_post")


def workloads(layer: int, n_heads: int, n_layers: int, tokens):
    site = f"blocks.{layer}.attn.hook_z"

    def ablation(model, k, **kw):
        hook = (site, functools.partial(zero_head, head=k % n_heads))
        return model.run_with_hooks(tokens, fwd_hooks=[hook], **kw)

    def ablation_metric(model, k, **kw):
        hook = (site, functools.partial(zero_head, head=k % n_heads))
        if kw:   # remote: the metric runs on the server
            return model.run_with_hooks(tokens, fwd_hooks=[hook], metric=logit_diff, **kw)
        return logit_diff(model.run_with_hooks(tokens, fwd_hooks=[hook]))

    def cache_all(model, k, **kw):
        logits, cache = model.run_with_cache(tokens, names_filter=is_resid_post, **kw)
        return logits, torch.stack([cache[f"blocks.{i}.hook_resid_post"]
                                    for i in range(n_layers)])
    def ablate_then_cache(model, k, **kw):
        with model.hooks(fwd_hooks=[(site, functools.partial(zero_head, head=k % n_heads))]):
            return cache_all(model, k, **kw)
    return {"ablation": ablation, "ablation_metric": ablation_metric, "cache_all": cache_all,
            "ablate_then_cache": ablate_then_cache}


class InProcessServer:
    """``hookwire.server.start`` in this process (its own copy of the model's weights)."""

    def __init__(self, model: str):
        import hookwire.server as hs
        self.handle = hs.start(models=[model], port=0)
        self.url = self.handle.url

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.stop()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="tiny-gpt2")
    ap.add_argument("--rounds", type=int, default=40)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--seq", type=int, default=16)
    ap.add_argument("--profile", choices=["client"], help="cProfile the remote calls")
    ap.add_argument("--profile-workload", default="ablation")
    ap.add_argument("--in-process", action="store_true",
                    help="the server in a thread of this process (hookwire.server.start)")
    ap.add_argument("--engine", choices=["embedded", "process"], default="embedded",
                    help="the server's engine (process: the model in a process of its own)")
    ap.add_argument("--json")
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.set_grad_enabled(False)
    local = load_model(args.model).bridge
    cfg = local.cfg
    tokens = torch.randint(0, 256, (1, args.seq), generator=torch.Generator().manual_seed(0))
    loads = workloads(cfg.n_layers // 2, cfg.n_heads, cfg.n_layers, tokens)
    server_cm = InProcessServer(args.model) if args.in_process else \
        ServerProcess(args.model, threads=1, engine=args.engine)
    with server_cm as server:
        hookwire.configure(url=server.url)
        remote = htl.RemoteModel(args.model)
        remote_kw = {"progress": False}
        for name, fn in loads.items():
            for k in range(cfg.n_heads):
                torch.testing.assert_close(fn(remote, k, **remote_kw), fn(local, k),
                                           rtol=1e-5, atol=1e-5)
        if args.profile:
            prof = cProfile.Profile()
            prof.enable()
            for k in range(args.rounds):
                loads[args.profile_workload](remote, k, **remote_kw)
            prof.disable()
            pstats.Stats(prof).sort_stats("cumulative").print_stats(45)
            hookwire.client.close_connections()
            return
        times = {f"{name}/{side}": [] for name in loads for side in ("remote", "local")}
        parts: dict = {name: [] for name in loads}
        clock = CallClock()
        try:
            for k in range(args.warmup + args.rounds):
                for name, fn in loads.items():   # interleaved: drift hits every column alike
                    for side, model, kw in (("local", local, {}),
                                            ("remote", remote, remote_kw)):
                        t0 = time.perf_counter()
                        fn(model, k, **kw)
                        t1 = time.perf_counter()
                        if k >= args.warmup:
                            times[f"{name}/{side}"].append((t1 - t0) * 1e3)
                            if side == "remote":
                                parts[name].append(clock.split(t0, t1))
        finally:
            clock.close()
        hookwire.client.close_connections()
    report = {"model": args.model, "batch": 1, "seq": args.seq, "rounds": args.rounds,
              "server": "in-process" if args.in_process else "subprocess",
              "engine": args.engine,
              "ms": {}, "ratio_remote_local": {}, "breakdown_ms": {}}
    for key, ts in times.items():
        report["ms"][key] = {"median": round(statistics.median(ts), 2),
                             "min": round(min(ts), 2), "max": round(max(ts), 2)}
    for name in loads:
        report["ratio_remote_local"][name] = round(
            report["ms"][f"{name}/remote"]["median"] / report["ms"][f"{name}/local"]["median"], 2)
    for name, rows in parts.items():
        report["breakdown_ms"][name] = {key: round(statistics.median(r[key] for r in rows), 2)
                                        for key in rows[0]}
    print(json.dumps(report, indent=2))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(report, fh, indent=2)


if __name__ == "__main__":
    main()
