"""Run pyvene's own integration tests locally and re-pointed at a hookwire server; compare.

    git clone https://github.com/stanfordnlp/pyvene /tmp/pyvene && git -C /tmp/pyvene checkout v0.1.8
    .venv/bin/python scripts/upstream/run_pyvene_tests.py /tmp/pyvene [--mode both] [pytest args]

pyvene's ``tests/`` folder is copied to a scratch folder (so its ``pyvene/`` source never
shadows the installed package) and run twice with pytest, one process per test file, with
``scripts/upstream/pyvene_plugin.py``: once as pyvene (``local``), once with every
``IntervenableModel`` a ``RemoteIntervenableModel`` on a server hosting the test's model
(``remote``). Prints each test's outcome in both modes, the exception type of remote failures,
and the counts: how many of the locally passing tests pass remotely.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET

HERE = os.path.dirname(os.path.abspath(__file__))


def run(mode: str, tests_root: str, extra: list[str]) -> dict[str, tuple[str, str]]:
    """Each test file in its own pytest process (pyvene's Llama test alone holds a 1B-parameter
    model, twice when it is hosted: one process for everything runs out of memory here)."""
    folder = os.path.join(tests_root, "tests", "integration_tests")
    env = dict(os.environ, HOOKWIRE_UPSTREAM_MODE=mode,
               PYTHONPATH=os.pathsep.join([HERE, os.environ.get("PYTHONPATH", "")]))
    outcomes = {}
    for fname in sorted(f for f in os.listdir(folder) if f.endswith("TestCase.py")):
        report = os.path.join(tests_root, f"report-{mode}-{fname}.xml")
        cmd = [sys.executable, "-m", "pytest", f"tests/integration_tests/{fname}",
               "-p", "pyvene_plugin", "-o", "python_files=*TestCase.py",
               "-p", "no:cacheprovider", "-q", "--timeout=900", f"--junitxml={report}", *extra]
        rc = subprocess.run(cmd, cwd=tests_root, env=env, check=False).returncode
        if not os.path.exists(report):
            outcomes[f"{fname[:-3]}::*"] = ("failed", f"pytest exited with {rc}, no report "
                                            "(killed? out of memory?)")
            continue
        for case in ET.parse(report).getroot().iter("testcase"):
            name = f"{case.get('classname').rsplit('.', 1)[-1]}::{case.get('name')}"
            status, detail = "passed", ""
            for tag in ("failure", "error", "skipped"):
                el = case.find(tag)
                if el is not None:
                    status = "skipped" if tag == "skipped" else "failed"
                    message = el.get("message") or ""
                    detail = message.splitlines()[0][:160] if message else ""
                    break
            outcomes[name] = (status, detail)
    return outcomes


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("pyvene_checkout", help="a checkout of stanfordnlp/pyvene (tag v0.1.8)")
    ap.add_argument("--mode", choices=("both", "local", "remote"), default="both")
    args, pytest_args = ap.parse_known_args(argv)  # the rest goes to pytest (-k trainable)
    args.pytest_args = pytest_args
    scratch = tempfile.mkdtemp(prefix="pyvene-upstream-")
    try:
        shutil.copytree(os.path.join(args.pyvene_checkout, "tests"),
                        os.path.join(scratch, "tests"))
        modes = ("local", "remote") if args.mode == "both" else (args.mode,)
        results = {m: run(m, scratch, args.pytest_args) for m in modes}
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    names = sorted(set().union(*(r.keys() for r in results.values())))
    for name in names:
        cells = [results[m].get(name, ("-", ""))[0] for m in modes]
        detail = results[modes[-1]].get(name, ("", ""))[1]
        print(f"{name:90s} " + " ".join(f"{c:8s}" for c in cells) +
              (f"  {detail}" if cells[-1] == "failed" else ""))
    if len(modes) == 2:
        local_ok = [n for n in names if results["local"].get(n, ("",))[0] == "passed"]
        remote_ok = [n for n in local_ok if results["remote"].get(n, ("",))[0] == "passed"]
        print(f"\n{len(names)} tests; {len(local_ok)} pass locally; {len(remote_ok)} of those "
              "pass remotely")


if __name__ == "__main__":
    main()
