"""A bounded load test in the suite: concurrent clients, mixed request kinds (batched and
solo, good and refused), each result compared with its solo run -- the same script as the
full 64 x 25 run (bench/load_test.py), at a size CI affords. The server is a subprocess on
127.0.0.1, stopped by PID."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "bench" / "load_test.py"


def test_load_nothing_lost_nothing_mismatched():
    proc = subprocess.run([sys.executable, str(SCRIPT), "--clients", "24", "--requests", "6"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(proc.stdout[proc.stdout.index("{"):])
    assert report["total"] == 24 * 6
    assert report["lost"] == 0 and report["mismatched"] == 0
    # Memory back near its baseline (bounded growth: allocator caches, not leaked requests).
    assert report["server_rss_mb_after"] - report["server_rss_mb_before"] < 200
