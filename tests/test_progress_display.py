"""Progress display: in a notebook, all the requests one cell makes share one widget (a
sweep of many calls does not pile up widgets); in a script, a bar is drawn on stderr only
when stderr is a terminal (tqdm's rule), unless ``progress=True`` forces it."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import ipywidgets  # noqa: F401  (the notebook bar is a widget: a dev dependency)
import nbclient
import nbformat
import pytest

WIDGET = "application/vnd.jupyter.widget-view+json"


def _widgets(cell) -> int:
    return sum(1 for out in cell.get("outputs", [])
               if out.get("output_type") == "display_data" and WIDGET in out.get("data", {}))


@pytest.mark.timeout(300)
def test_one_widget_per_notebook_cell(tmp_path):
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(textwrap.dedent(source)) for source in (
        """
        import torch, hookwire.server as hs, hookwire.transformerlens as htl
        srv = hs.start(models=["tiny-gpt2"], port=0)
        model = htl.RemoteModel("tiny-gpt2", url=srv.url)
        tokens = model.to_tokens("hello world")
        """,
        """
        outs = [model.run_with_hooks(tokens, progress=True,
                                     fwd_hooks=[("blocks.0.hook_resid_post",
                                                 lambda act, hook, s=s: act * s)])
                for s in range(6)]
        """,
        """
        logits, cache = model.run_with_cache(tokens, progress=True)
        """,
        """
        srv.stop()
        """)]
    client = nbclient.NotebookClient(nb, timeout=240, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()
    assert _widgets(nb.cells[1]) == 1  # six requests, one bar
    assert _widgets(nb.cells[2]) == 1  # a new cell, a new bar


SCRIPT = textwrap.dedent("""
    import sys, hookwire.server as hs, hookwire.transformerlens as htl
    srv = hs.start(models=["tiny-gpt2"], port=0)
    model = htl.RemoteModel("tiny-gpt2", url=srv.url)
    flag = {"default": None, "on": True, "off": False}[sys.argv[1]]
    model.run_with_hooks(model.to_tokens("hello"), progress=flag,
                         fwd_hooks=[("blocks.0.hook_resid_post", lambda act, hook: act)])
    srv.stop()
""")


@pytest.mark.timeout(300)
@pytest.mark.parametrize("flag,shown", [("default", False), ("on", True), ("off", False)])
def test_script_bar_only_on_a_terminal_unless_forced(tmp_path, flag, shown):
    script = tmp_path / "script.py"
    script.write_text(SCRIPT)
    done = subprocess.run([sys.executable, str(script), flag], capture_output=True, text=True,
                          timeout=240, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert done.returncode == 0, done.stderr[-2000:]
    assert ("hookwire tiny-gpt2" in done.stderr) == shown, done.stderr[-2000:]
