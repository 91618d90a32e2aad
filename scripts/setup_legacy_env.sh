#!/usr/bin/env bash
# Create .venv-legacy: a *user* environment with TransformerLens 2.x (HookedTransformer) and
# transformers 4.57, which cannot share an environment with the server's TL 4 /
# transformers 5. The test suite runs hookwire's client from it against a server started
# from .venv (tests/test_tl_legacy_client.py).
#
# torch==2.13.0 is installed FIRST (a fast local CPU build here; an unpinned torch would pull
# a multi-GB CUDA build). TL 2.18 (the last 2.x) needs, to import, "datasets<4" and
# "pyarrow<21" (and so numpy<2). hookwire itself goes in with --no-deps (its [tl] extra would
# pull TL 4), its other dependencies are read from pyproject.toml and installed with the pins.
# Idempotent: a re-run with unchanged pins and a working venv does nothing.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

VENV="$ROOT/.venv-legacy"
PY="$VENV/bin/python"
TORCH_PIN="torch==2.13.0"
LEGACY_PINS=("transformer-lens==2.18.0" "transformers==4.57.*" "datasets<4" "pyarrow<21"
             "numpy<2")
STAMP="$VENV/.hookwire-legacy-setup"
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1

log() { echo "[setup-legacy] $*"; }

# shellcheck source=scripts/_venv.sh
source "$ROOT/scripts/_venv.sh"
ensure_venv

# What the installed state must match: this script (its pins), pyproject and the checkout.
WANT="$( { cat "${BASH_SOURCE[0]}" pyproject.toml; echo "$ROOT"; } | sha256sum | cut -d' ' -f1)"

installed_ok() {
    [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT" ] &&
    "$PY" - <<'PY' >/dev/null 2>&1
# Metadata only (no imports of torch/TL): a re-run stays well under a second.
import sys
from importlib.metadata import PackageNotFoundError, version
try:
    assert version("torch").split("+")[0] == "2.13.0"
    assert version("transformer-lens").startswith("2.")
    assert version("transformers").startswith("4.57.")
    for dist in ("hookwire", "pydantic", "websockets", "tqdm", "tokenizers"):
        version(dist)
except (AssertionError, PackageNotFoundError):
    sys.exit(1)
PY
}

if installed_ok; then
    log "environment up to date ($VENV)"
    exit 0
fi

# hookwire's own dependencies from pyproject.toml, less the two pinned above (torch, and
# transformers, which must stay 4.57 here): pydantic, websockets, tqdm, tokenizers, numpy...
mapfile -t LIGHT_DEPS < <("$PY" - <<'PY'
import re, tomllib
with open("pyproject.toml", "rb") as fh:
    deps = tomllib.load(fh)["project"]["dependencies"]
for dep in deps:
    if re.split(r"[<>=!~;\[ ]", dep, maxsplit=1)[0].lower() not in ("torch", "transformers"):
        print(dep)
PY
)
log "installing $TORCH_PIN (CPU build) first"
"$PY" -m pip install -q --progress-bar off "$TORCH_PIN"
log "installing ${LEGACY_PINS[*]} ${LIGHT_DEPS[*]}"
"$PY" -m pip install -q --progress-bar off "$TORCH_PIN" "${LEGACY_PINS[@]}" "${LIGHT_DEPS[@]}"
log "installing hookwire (editable, --no-deps)"
"$PY" -m pip install -q --progress-bar off --no-deps -e .
# Fail loudly here, not in the tests, if the pins did not hold or the client cannot import.
"$PY" - <<'PY'
import torch, transformers, transformer_lens
from importlib.metadata import version
print("[setup-legacy] torch", torch.__version__, "| transformers", transformers.__version__,
      "| transformer-lens", version("transformer-lens"))
assert torch.__version__.startswith("2.13.0"), torch.__version__
assert transformers.__version__.startswith("4.57."), transformers.__version__
assert version("transformer-lens").startswith("2."), version("transformer-lens")
from transformer_lens import HookedTransformer  # noqa: F401
import hookwire.transformerlens  # noqa: F401  (the client imports without TL 4)
PY
echo "$WANT" > "$STAMP"
log "done ($VENV)"
