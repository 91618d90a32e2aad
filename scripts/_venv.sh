# Shared by setup.sh and setup_legacy_env.sh (sourced, not run): find a Python >= 3.11 and
# create the venv at $VENV with it unless a working one is there. Needs log() and VENV.

pick_python() {
    local cand
    for cand in python3.11 python3; do
        if command -v "$cand" >/dev/null 2>&1 &&
           "$cand" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)' 2>/dev/null; then
            echo "$cand"
            return 0
        fi
    done
    echo "error: hookwire needs Python >= 3.11 (python3.11 or python3 on PATH)" >&2
    return 1
}

ensure_venv() {
    if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c 'import sys' >/dev/null 2>&1; then
        local base
        base="$(pick_python)"
        log "creating $VENV with $base ($("$base" --version 2>&1))"
        rm -rf "$VENV"
        "$base" -m venv "$VENV"
    fi
}
