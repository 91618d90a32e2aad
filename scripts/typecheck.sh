#!/usr/bin/env bash
# Type-check the core's central modules with mypy ([tool.mypy] in pyproject.toml lists them).
# The core lives in bridge/ but is imported as `hookwire` (pyproject's package-dir), a
# mapping mypy cannot see through an editable install: build/mypy-path/hookwire links to
# bridge/ and [tool.mypy] mypy_path points there. Any finding fails (exit status 1).
# Extra arguments go to mypy. Cache: .mypy_cache (a warm re-run takes a few seconds).
# (set -o pipefail: the status is mypy's, not sed's.)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
mkdir -p build/mypy-path
ln -sfn ../../bridge build/mypy-path/hookwire
# Findings name the files where they are edited (bridge/...), not the link.
.venv/bin/mypy --python-executable .venv/bin/python "$@" 2>&1 |
    sed -u 's#^build/mypy-path/hookwire/#bridge/#'
