"""The long fuzzing run, outside CI: tests/test_fuzz.py with HOOKWIRE_FUZZ_EXAMPLES messages
(100,000 by default) and fresh randomness (HOOKWIRE_FUZZ_RANDOM), then its figures: messages
per layer, outcomes by error type, wall time.

    .venv/bin/python bench/fuzz_extended.py [--messages 100000]
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--messages", type=int, default=100_000)
    args = ap.parse_args()
    env = dict(os.environ, HOOKWIRE_FUZZ_EXAMPLES=str(args.messages), HOOKWIRE_FUZZ_RANDOM="1",
               OMP_NUM_THREADS="1")
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider",
                           "-o", "timeout=0", "tests/test_fuzz.py"],
                          cwd=ROOT, env=env, capture_output=True, text=True)
    elapsed = time.perf_counter() - t0
    layers = {}
    for m in re.finditer(r"fuzz (\w+): (\d+) messages (\{.*\})", proc.stdout):
        layers[m.group(1)] = {"messages": int(m.group(2)),
                              "outcomes": json.loads(m.group(3).replace("'", '"'))}
    tail = proc.stdout.strip().splitlines()[-1:] if proc.stdout.strip() else []
    print(json.dumps({"requested": args.messages,
                      "messages": sum(v["messages"] for v in layers.values()),
                      "seconds": round(elapsed, 1), "pytest": tail, "exit": proc.returncode,
                      "layers": layers}, indent=1))
    if proc.returncode:
        print(proc.stdout[-20000:], proc.stderr[-5000:], sep="\n")
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main())
