#!/usr/bin/env bash
# Set up .venv if needed, then run `hookwire demo`: a server on the embedded default model in
# the background, one TransformerLens hook example run remotely and locally, compared.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash scripts/setup.sh
exec .venv/bin/hookwire demo "$@"
