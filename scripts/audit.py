"""Audit the installed environment (.venv) for known vulnerabilities, loudly.

Runs pip-audit (PyPI's vulnerability data, which is OSV's). Where pip-audit cannot look a
package's version up (some package mirrors answer only the project-level JSON), the same
data is read from the project's PyPI JSON, which lists the vulnerabilities of its *latest*
release: it counts only when that is the installed version; otherwise the package is
reported as not audited, by name.

Exit status (scripts/test.sh runs this before the tests):
* 1 -- a known vulnerability in a direct dependency (pyproject.toml: dependencies and the
  extras) that scripts/audit-ignore.txt does not list with a justification;
* 0 -- otherwise, including vulnerabilities in indirect dependencies (printed, to be fixed by
  upgrading the direct dependency that pulls them in) and a network with no vulnerability
  database in reach (printed as NOT AUDITED: never a silent pass, never a red CI for an
  absent network).
"""
from __future__ import annotations

import json
import re
import subprocess
import sys
import tomllib
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from importlib.metadata import version
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
IGNORE_FILE = ROOT / "scripts" / "audit-ignore.txt"
PYPI_JSON = "https://pypi.org/pypi/{}/json"


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def direct_dependencies() -> set[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = list(project["dependencies"])
    for extra in project.get("optional-dependencies", {}).values():
        reqs += extra
    return {_norm(re.split(r"[<>=!~\[; ]", r, maxsplit=1)[0]) for r in reqs}


def ignored() -> dict[str, str]:
    """vulnerability id -> justification (lines: ``ID  package  why``; # comments)."""
    out = {}
    if IGNORE_FILE.exists():
        for line in IGNORE_FILE.read_text().splitlines():
            line = line.split("#", 1)[0].strip()
            if line:
                parts = line.split(None, 2)
                if len(parts) < 3:
                    sys.exit(f"audit-ignore.txt: '{line}' needs an id, a package and a reason")
                out[parts[0]] = f"{parts[1]}: {parts[2]}"
    return out


def run_pip_audit() -> list[dict] | None:
    cmd = [sys.executable, "-m", "pip_audit", "--format", "json", "--progress-spinner", "off",
           "--skip-editable"]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        return json.loads(proc.stdout)["dependencies"]
    except (OSError, subprocess.TimeoutExpired, ValueError, KeyError) as exc:
        print(f"[audit] pip-audit did not run: {type(exc).__name__}: {exc}")
        return None


def project_json_vulns(dep: dict) -> list[dict] | None:
    """The vulnerabilities PyPI lists for the latest release, if that is what is installed."""
    name = dep["name"]
    try:
        installed = version(name).split("+")[0]
        with urllib.request.urlopen(PYPI_JSON.format(name), timeout=15) as resp:
            data = json.load(resp)
    except Exception:
        return None
    if data.get("info", {}).get("version") != installed:
        return None
    return [{"id": v.get("id"), "aliases": v.get("aliases", []), "fix_versions": v.get("fixed_in", [])}
            for v in data.get("vulnerabilities", [])]


def main() -> int:
    deps = run_pip_audit()
    if deps is None:
        print("[audit] NOT AUDITED: pip-audit failed to run (see above)")
        return 0
    todo = [d for d in deps if "skip_reason" in d and not d["name"] == "hookwire"]
    with ThreadPoolExecutor(8) as pool:
        for dep, vulns in zip(todo, pool.map(project_json_vulns, todo)):
            if vulns is not None:
                dep.pop("skip_reason")
                dep["vulns"] = vulns
    audited = [d for d in deps if "skip_reason" not in d]
    unaudited = sorted(d["name"] for d in deps if "skip_reason" in d and d["name"] != "hookwire")
    direct, ignore = direct_dependencies(), ignored()
    failing = []
    for dep in audited:
        for v in dep.get("vulns", []):
            is_direct = _norm(dep["name"]) in direct
            status = "ignored: " + ignore[v["id"]] if v["id"] in ignore else \
                "DIRECT DEPENDENCY" if is_direct else "indirect"
            print(f"[audit] VULNERABLE {dep['name']} {dep.get('version', '')}: {v['id']} "
                  f"{' '.join(v.get('aliases', []))} fixed in {v.get('fix_versions')} ({status})")
            if is_direct and v["id"] not in ignore:
                failing.append(v["id"])
    print(f"[audit] {len(audited)} of {len(audited) + len(unaudited)} installed packages "
          f"audited; {sum(len(d.get('vulns', [])) for d in audited)} known vulnerabilities")
    if unaudited:
        print(f"[audit] NOT AUDITED (no vulnerability data for the installed version reachable "
              f"from here): {', '.join(unaudited)}")
    if not audited:
        print("[audit] WARNING: no vulnerability database was reachable; nothing was audited")
    if failing:
        print(f"[audit] FAILED: {len(failing)} known vulnerabilities in direct dependencies "
              f"({', '.join(failing)}): upgrade, or justify each in {IGNORE_FILE.name}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
