"""Compare a local and a remote run of TransformerLens's own tests (reports written by
tests/upstream/tl_remote_plugin.py) and print the counts and every remote failure.

    python tests/upstream/compare.py LOCAL REMOTE

LOCAL and REMOTE are report files, or folders of them (one per test file).
"""
from __future__ import annotations

import glob
import json
import os
import sys
from collections import Counter


def load(path):
    paths = sorted(glob.glob(os.path.join(path, "*.json"))) if os.path.isdir(path) else [path]
    tests = {}
    for p in paths:
        with open(p) as fh:
            tests.update({t["nodeid"]: t for t in json.load(fh)["tests"]})
    return tests


def category(test) -> str:
    if test["outcome"] == "passed":
        return "passes remotely"
    if test.get("host_errors"):
        return "model refused by the server"
    if test.get("hookwire_error"):
        return f"typed refusal ({test['hookwire_error']})"
    return "fails remotely (untyped)"


def main(local_path, remote_path):
    local, remote = load(local_path), load(remote_path)
    passing = [n for n, t in local.items() if t["outcome"] == "passed"]
    print(f"selected tests: {len(local)}; pass locally: {len(passing)}; "
          f"local outcomes: {dict(Counter(t['outcome'] for t in local.values()))}")
    reached = [n for n in passing if n in remote and remote[n]["hooked_forwards"] > 0]
    print(f"of those, reached a server (a forward with hooks): {len(reached)}")
    counts = Counter(category(remote[n]) for n in reached)
    for cat, n in sorted(counts.items(), key=lambda kv: -kv[1]):
        print(f"  {cat}: {n}")
    unreached_failing = [n for n in passing if n in remote and remote[n]["hooked_forwards"] == 0
                         and remote[n]["outcome"] != "passed"]
    if unreached_failing:
        print(f"pass locally, fail remotely without reaching a server: {len(unreached_failing)}")
    print()
    for n in reached + unreached_failing:
        t = remote[n]
        if t["outcome"] != "passed":
            print(f"[{category(t)}] {n}\n    {t.get('error_type')}: {t.get('error')} "
                  f"({t.get('where')})")
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:3]))
