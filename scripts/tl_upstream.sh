#!/usr/bin/env bash
# Run TransformerLens's own tests (hook orchestration, hook points, component and per-head
# hooks, stop/start_at_layer, gated hooks, pretrain adapter, caching hooks...) twice: locally,
# then with every hooked forward on a hookwire server (tests/upstream/tl_remote_plugin.py),
# and print how the remote run compares, test by test (tests/upstream/compare.py).
#
# TL's tests are not in this repository: they come from the sdist of the installed
# transformer-lens version, downloaded once into .cache/tl-upstream (or pass a folder that
# holds an unpacked sdist: TL_SDIST_DIR=/path/to/transformer_lens-4.3.0). Extra arguments go
# to both pytest runs (e.g. -k stop_at_layer). Reports: .cache/tl-upstream/{local,remote}/*.json
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="$ROOT/.venv/bin/python"
CACHE="$ROOT/.cache/tl-upstream"
mkdir -p "$CACHE"
VERSION="$("$PY" -c 'from importlib.metadata import version; print(version("transformer-lens"))')"
SDIST="${TL_SDIST_DIR:-$CACHE/transformer_lens-$VERSION}"
if [ ! -d "$SDIST/tests" ]; then
    echo "[tl_upstream] downloading the transformer-lens $VERSION sdist (its tests)"
    "$PY" -m pip download --quiet --no-deps --no-binary :all: "transformer-lens==$VERSION" \
        -d "$CACHE" >/dev/null
    tar xzf "$CACHE/transformer_lens-$VERSION.tar.gz" -C "$CACHE"
fi

TESTS=(
    tests/unit/model_bridge/supported_architectures/test_hook_orchestration_parity.py
    tests/unit/test_hook_points.py
    tests/unit/model_bridge/test_component_hooks_fire.py
    tests/unit/model_bridge/test_per_head_hooks_component.py
    tests/integration/model_bridge/test_bridge_stop_at_layer.py
    tests/integration/model_bridge/test_bridge_start_at_layer.py
    tests/unit/model_bridge/test_stop_at_layer_guard.py
    tests/unit/model_bridge/test_gated_hooks.py
    tests/unit/model_bridge/test_benchmark_gated_hooks_fire.py
    tests/integration/model_bridge/test_bloom_gated_hooks.py
    tests/unit/model_bridge/supported_architectures/test_pretrain_adapter.py
    tests/integration/model_bridge/test_pretrain_adapter.py
    tests/unit/model_bridge/supported_architectures/test_pretrain_model_container.py
    tests/unit/model_bridge/test_bridge_cross_run_qkv_patching.py
    tests/unit/model_bridge/test_bridge_cross_run_mlp_in_patching.py
    tests/unit/model_bridge/test_caching_hooks_aliases.py
    tests/unit/model_bridge/test_run_with_hooks_remove_batch_dim.py
    tests/unit/model_bridge/test_reset_hooks_registry.py
    tests/unit/model_bridge/test_end_to_end_bridge.py
    tests/unit/model_bridge/test_boot_native.py
    tests/unit/model_bridge/test_native_features.py
    tests/integration/model_bridge/test_bridge_hook_scope.py
    tests/integration/model_bridge/test_bridge_caching_hooks.py
    tests/integration/model_bridge/test_bridge_run_with_cache_incl_bwd.py
    tests/integration/model_bridge/test_bridge_run_with_cache_pos_slice.py
)

run() {  # $1: local|remote, then extra pytest arguments. One pytest process per test file:
    # the hub-checkpoint stand-ins are GPT-2-sized, and a whole session's worth of them (each
    # with a server copy) does not fit a small machine's memory.
    local mode="$1"; shift
    rm -rf "$CACHE/$mode" && mkdir -p "$CACHE/$mode"
    echo "[tl_upstream] $mode run"
    for test in "${TESTS[@]}"; do
        report="$CACHE/$mode/$(echo "$test" | tr '/' '_').json"
        (cd "$SDIST" && HF_HUB_OFFLINE=1 PYTHONPATH="$ROOT/tests/upstream:$SDIST" \
            "$PY" -m pytest -p tl_remote_plugin -p no:cacheprovider -o addopts="" -q \
            --hookwire-mode="$mode" --hookwire-report="$report" \
            --hookwire-offline-checkpoints="$CACHE/checkpoints" "$test" "$@" \
            | tail -n 1 | sed "s|^|    $test: |") || true
    done
}
run local "$@"
run remote "$@"
"$PY" tests/upstream/compare.py "$CACHE/local" "$CACHE/remote"
