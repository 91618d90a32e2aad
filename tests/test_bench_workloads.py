"""The benchmark suite's workloads compute the same thing in every column: local
TransformerLens, local pyvene, local NNsight, hookwire remote and NNsight code on hookwire (the
suite checks this before timing; here it is checked on tiny-gpt2 without timing anything, so
the suite cannot rot)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.suite import build_tools, check_equal  # noqa: E402
from bench.workloads import WORKLOADS  # noqa: E402


@pytest.fixture(scope="module")
def local_copies(server):
    return {}


@pytest.mark.parametrize("workload", WORKLOADS, ids=lambda w: w.name)
def test_columns_agree(workload, local_copies):
    tools = build_tools("tiny-gpt2", 2, local_copies)
    with torch.set_grad_enabled(workload.grad):
        if workload.setup is not None:
            workload.setup(tools)
        checked = check_equal(workload, tools)
    # every column but the floor and the reference was compared
    assert set(checked) == set(workload.columns) - {"plain", workload.compare_to}
    assert "remote" in checked
    if "nnsight" in workload.columns:   # NNsight's own code, on the weightless remote model
        assert "nnsight_remote" in checked
