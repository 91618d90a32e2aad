#!/usr/bin/env bash
# Set up .venv if needed, then run scripts/demo.py: a `hookwire serve` child on the embedded
# default model, one TransformerLens hook example run remotely and locally, compared.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash scripts/setup.sh
exec .venv/bin/python scripts/demo.py "$@"
