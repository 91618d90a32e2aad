"""Every runnable script in examples/ runs to completion (exit code 0) in a fresh interpreter.

Each example starts its own in-process server on an ephemeral port, compares remote results
with local TL using ``torch.testing.assert_close`` and stops the server in ``finally``, so a
zero exit code means every comparison in it held.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES_DIR = Path(__file__).resolve().parent.parent / "examples"
EXAMPLES = sorted(p.name for p in EXAMPLES_DIR.glob("*.py") if not p.name.startswith("_"))  # _x.py: helpers
REQUIRED = {"cache_logit_lens.py", "head_ablation_sweep.py", "activation_patching_sweep.py",
            "attribution_patching.py", "steer_generation.py"}
TIMEOUT_S = 300


def test_required_examples_exist():
    assert REQUIRED <= set(EXAMPLES), sorted(REQUIRED - set(EXAMPLES))


@pytest.mark.parametrize("example", EXAMPLES)
def test_example_runs(example):
    proc = subprocess.run([sys.executable, str(EXAMPLES_DIR / example)],
                          cwd=EXAMPLES_DIR.parent, capture_output=True, text=True,
                          timeout=TIMEOUT_S)
    assert proc.returncode == 0, (f"{example} exited with {proc.returncode}\n"
                                  f"--- stdout ---\n{proc.stdout[-4000:]}\n"
                                  f"--- stderr ---\n{proc.stderr[-4000:]}")
    assert "remote == local" in proc.stdout or "match" in proc.stdout, proc.stdout[-2000:]
