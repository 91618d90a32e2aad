"""Every notebook in examples/ runs top to bottom in a real Jupyter kernel (nbclient +
ipykernel, the kernel being this venv's Python), and fails the suite if any cell errors.

Each notebook starts its own hookwire server on 127.0.0.1 and stops it in its last cell; the
kernel is shut down when the run ends, error or not. Plots go to ``HOOKWIRE_FIGURES`` (a
temporary folder here) and must exist and be non-empty PNGs. Committed notebooks carry no
outputs.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import nbclient
import nbformat
import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
FIGURES = {
    "getting_started.ipynb": ["getting_started_patching.png"],
    "side_by_side.ipynb": ["side_by_side_timings.png", "side_by_side_patching.png"],
    "pyvene_remote.ipynb": ["pyvene_interchange.png"],
    "nnsight_remote.ipynb": ["nnsight_activation_patching.png", "nnsight_logit_lens.png"],
}
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_every_notebook_is_tested():
    assert sorted(p.name for p in EXAMPLES.glob("*.ipynb")) == sorted(FIGURES)


@pytest.mark.parametrize("name", sorted(FIGURES))
def test_committed_notebook_has_no_outputs(name):
    nb = nbformat.read(EXAMPLES / name, as_version=4)
    nbformat.validate(nb)
    for k, cell in enumerate(nb.cells):
        # no cell may be allowed to fail (nbclient's raises-exception tag)
        assert "raises-exception" not in cell.metadata.get("tags", []), (name, k)
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, \
                f"{name} cell {k} has outputs: strip them before committing"


def _errors(cell) -> list:
    return [o for o in cell.get("outputs", []) if o.get("output_type") == "error"]


@pytest.mark.timeout(600)
@pytest.mark.parametrize("name", sorted(FIGURES))
def test_notebook_runs(name, tmp_path, monkeypatch):
    monkeypatch.setenv("HOOKWIRE_FIGURES", str(tmp_path))
    monkeypatch.setenv("MPLBACKEND", "Agg")   # no display; savefig is what is checked
    nb = nbformat.read(EXAMPLES / name, as_version=4)
    # One cell added here, not in the notebook: which Python the kernel runs.
    nb.cells.append(nbformat.v4.new_code_cell("import sys; print(sys.executable)"))
    client = nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                                     resources={"metadata": {"path": str(EXAMPLES)}})
    client.execute()   # raises CellExecutionError on the first cell that errors

    printed = "".join(o.get("text", "") for o in nb.cells[-1].outputs).strip()
    assert os.path.realpath(printed) == os.path.realpath(sys.executable), printed
    for figure in FIGURES[name]:
        path = tmp_path / figure
        assert path.is_file(), f"{name} did not save {figure}"
        data = path.read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 2000, (figure, len(data))
    assert not [k for k, cell in enumerate(nb.cells) if _errors(cell)]
