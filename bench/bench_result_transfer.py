"""What a large result costs to bring back: gpt2-small-random, batch 8 x 128, no hooks, the
206 MB of logits returned or not (``return_type=None`` runs the same forward), local TL in the
same rounds. Calls interleave (logits, None, local) round by round, so the machine's drift
falls on all three alike.

Printed (medians, ms): the remote call's wall time with and without logits and local TL's;
what returning the logits adds to the remote call's wall time, to the client process's CPU
time and to the server process's CPU time; and remote / local with logits (P1's ratio
without P1's hooks).

    python bench/bench_result_transfer.py [--rounds 10] [--json out.json]
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
from hookwire.server.models import load_model

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from server_proc import ServerProcess  # noqa: E402

MODEL = "gpt2-small-random"
_TICKS = os.sysconf("SC_CLK_TCK")


def process_cpu_s(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` (Linux ``/proc``)."""
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICKS


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--json")
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    local = load_model(MODEL).bridge
    tokens = torch.randint(0, 256, (8, 128), generator=torch.Generator().manual_seed(0))
    with ServerProcess(MODEL) as server:
        hookwire.configure(url=server.url)
        remote = htl.RemoteModel(MODEL)
        torch.testing.assert_close(remote(tokens), local(tokens))
        for return_type in ("logits", None, "logits", None):  # warm up
            remote.run_with_hooks(tokens, return_type=return_type)
        samples: dict[str, list[tuple[float, float, float]]] = {"logits": [], "none": [],
                                                                "local": []}
        for _ in range(args.rounds):
            for key in ("logits", "none", "local"):
                c0, s0, w0 = time.process_time(), process_cpu_s(server.proc.pid), \
                    time.perf_counter()
                if key == "local":
                    local.run_with_hooks(tokens)
                else:
                    remote.run_with_hooks(tokens, return_type="logits" if key == "logits"
                                          else None)
                samples[key].append((time.process_time() - c0,
                                     process_cpu_s(server.proc.pid) - s0,
                                     time.perf_counter() - w0))

    def med(key: str, i: int) -> float:
        return statistics.median(s[i] for s in samples[key]) * 1e3

    results = {
        "remote_logits_ms": med("logits", 2), "remote_none_ms": med("none", 2),
        "local_logits_ms": med("local", 2),
        "logits_add_wall_ms": med("logits", 2) - med("none", 2),
        "logits_add_client_cpu_ms": med("logits", 0) - med("none", 0),
        "logits_add_server_cpu_ms": med("logits", 1) - med("none", 1),
    }
    results["remote_over_local"] = results["remote_logits_ms"] / results["local_logits_ms"]
    print(f"remote with logits {results['remote_logits_ms']:.0f} ms, without "
          f"{results['remote_none_ms']:.0f} ms, local TL {results['local_logits_ms']:.0f} ms "
          f"(remote / local {results['remote_over_local']:.3f})")
    print(f"the logits add: wall {results['logits_add_wall_ms']:.0f} ms, client CPU "
          f"{results['logits_add_client_cpu_ms']:.0f} ms, server CPU "
          f"{results['logits_add_server_cpu_ms']:.0f} ms")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=2)


if __name__ == "__main__":
    main()
