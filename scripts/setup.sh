#!/usr/bin/env bash
# Create .venv (if missing) and install hookwire with its TransformerLens, pyvene, Ray and dev
# extras.
#
# torch==2.13.0 is installed FIRST and on purpose: on these machines it is a fast local CPU
# build, whereas an unpinned torch (pulled in by a dependency) would fetch a multi-GB CUDA
# build. Idempotent: a re-run with an unchanged pyproject.toml and a working venv does nothing.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

VENV="$ROOT/.venv"
PY="$VENV/bin/python"
TORCH_PIN="torch==2.13.0"
STAMP="$VENV/.hookwire-setup"
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1

log() { echo "[setup] $*"; }

# shellcheck source=scripts/_venv.sh
source "$ROOT/scripts/_venv.sh"
ensure_venv

# What the installed state must match: the project's metadata and the torch pin.
WANT="$( { cat pyproject.toml; echo "$TORCH_PIN"; echo "$ROOT"; } | sha256sum | cut -d' ' -f1)"

installed_ok() {
    [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT" ] &&
    "$PY" - <<'PY' >/dev/null 2>&1
# Metadata only (no torch import): a re-run stays well under a second.
import sys
from importlib.metadata import PackageNotFoundError, version
try:
    assert version("torch").split("+")[0] == "2.13.0"
    for dist in ("hookwire", "transformer-lens", "pyvene", "pytest", "pytest-timeout", "pytest-xdist",
                 "hypothesis", "pip-audit", "ray", "nnsight", "nbclient", "ipykernel", "ruff",
                 "mypy"):
        version(dist)
except (AssertionError, PackageNotFoundError):
    sys.exit(1)
PY
}

if installed_ok; then
    log "environment up to date ($VENV)"
    exit 0
fi

log "installing $TORCH_PIN (CPU build) first"
"$PY" -m pip install -q --progress-bar off "$TORCH_PIN"
log "installing hookwire (editable) with extras [tl,dev,pyvene,ray]"
"$PY" -m pip install -q --progress-bar off -e ".[tl,dev,pyvene,ray]"
# Keep the CPU build even if a dependency resolver tried to move it.
"$PY" -c 'import torch, sys; v = torch.__version__; print("[setup] torch", v); sys.exit(0 if v.startswith("2.13.0") else 1)'
echo "$WANT" > "$STAMP"
log "done ($VENV)"
