#!/usr/bin/env bash
# Set up .venv (and .venv-legacy) if needed, lint, then run the whole test suite. Extra arguments go to pytest.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash scripts/setup.sh
# Lint first (seconds): the rules that find bugs ([tool.ruff] in pyproject.toml); any finding
# fails the run before the tests start.
.venv/bin/ruff check .
# Type check (under a minute cold, seconds warm): mypy on the core's central modules
# ([tool.mypy] in pyproject.toml); any finding fails the run too.
bash scripts/typecheck.sh
# The TL 2.x client environment for tests/test_tl_legacy_client.py (fails loudly if it
# cannot be built; a re-run with nothing changed takes well under a second).
bash scripts/setup_legacy_env.sh
# Known vulnerabilities in the installed dependencies, printed; fails only on one in a direct
# dependency that scripts/audit-ignore.txt does not justify (see scripts/audit.py).
.venv/bin/python scripts/audit.py
# Two worker processes (HOOKWIRE_TEST_WORKERS=1 runs them in this one): each test file runs
# whole on one worker, the Ray files and every Ray-engine test together on one
# (tests/conftest.py, tests/engines.py), so module fixtures are built once and two Ray
# instances never start side by side.
WORKERS="${HOOKWIRE_TEST_WORKERS:-2}"
if [ "$WORKERS" -gt 1 ]; then
    exec .venv/bin/python -m pytest -q -n "$WORKERS" --dist loadgroup tests/ "$@"
fi
exec .venv/bin/python -m pytest -q tests/ "$@"
