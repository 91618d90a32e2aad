#!/usr/bin/env bash
# What we run the day a machine with CUDA is at hand: the family matrix and the main
# benchmarks with the models on the GPU, on one device and, where there are two, split over
# two (accelerate's device_map), then a summary.
#
#   bash scripts/gpu_check.sh               # on a CUDA machine (~15-30 min)
#   bash scripts/gpu_check.sh --quick       # a handful of families, short benchmarks
#   bash scripts/gpu_check.sh --cpu         # the same steps on the CPU, quick: checks the script
#   bash scripts/gpu_check.sh --out DIR     # logs and JSON figures there (default: a new /tmp dir)
#
# Python: $HOOKWIRE_PYTHON, else .venv-gpu/bin/python, else .venv/bin/python, else python3 --
# the first one with torch, hookwire (editable install of this checkout), TransformerLens and
# pyvene, and (without --cpu) a CUDA build of torch that sees a GPU. To make one on a GPU
# machine with network access:
#   python3.11 -m venv .venv-gpu && .venv-gpu/bin/pip install torch   # the CUDA build
#   .venv-gpu/bin/pip install -e ".[tl,dev,pyvene]"
#
# Steps (each logged to DIR/<step>.log; a failing step does not stop the others):
#   matrix-fp32     tests/test_families.py, models and local references on cuda:0, float32
#   matrix-bf16     the same in bfloat16
#   matrix-split    (2+ GPUs) servers split layer-wise over cuda:0 and cuda:1; with --cpu:
#                   over the CPU and disk offload
#   sharded         tests/test_sharded_model.py and tests/test_devices.py (CPU+disk splits,
#                   placement rules): these hold on any machine
#   bench-tl        bench/bench_tl_remote.py: TL run_with_hooks, gpt2-small-random 8x128
#   bench-pyvene    bench/bench_pyvene_remote.py: vanilla interchange, 8x64
#   bench-generate  bench/bench_generate.py: 32 tokens with a steering hook
#   bench-tl-bf16   (GPU) bench-tl in bfloat16
# Benchmarks run the server and the local model on the same device, in the same run, and
# assert remote == local before timing.
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

MODE=gpu QUICK=0 OUT=""
while [ $# -gt 0 ]; do
    case "$1" in
        --cpu) MODE=cpu; QUICK=1 ;;
        --quick) QUICK=1 ;;
        --out) OUT="$2"; shift ;;
        -h|--help) sed -n '2,/^set -uo/p' "$0" | sed '$d'; exit 0 ;;
        *) echo "gpu_check: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done
OUT="${OUT:-$(mktemp -d /tmp/hookwire-gpu-check-XXXXXX)}"
mkdir -p "$OUT"

# ---- which python --------------------------------------------------------------------------
PROBE='import sys, torch, hookwire, transformer_lens, pyvene
need_cuda = sys.argv[1] == "gpu"
print(torch.__version__, torch.cuda.device_count() if torch.cuda.is_available() else 0)
sys.exit(0 if (not need_cuda or torch.cuda.is_available()) else 3)'
PY=""
for cand in "${HOOKWIRE_PYTHON:-}" "$ROOT/.venv-gpu/bin/python" "$ROOT/.venv/bin/python" python3; do
    [ -n "$cand" ] || continue
    command -v "$cand" >/dev/null 2>&1 || [ -x "$cand" ] || continue
    if FOUND="$("$cand" -c "$PROBE" "$MODE" 2>/dev/null)"; then PY="$cand"; break; fi
done
if [ -z "$PY" ]; then
    echo "gpu_check: no Python here has torch + hookwire + TransformerLens + pyvene" \
         "$([ "$MODE" = gpu ] && echo "and a CUDA device") (see the top of this script;" \
         "--cpu checks the script on the CPU)" >&2
    exit 2
fi
read -r TORCH_VERSION N_GPUS <<<"$FOUND"
DEVICE=$([ "$MODE" = gpu ] && echo "cuda:0" || echo cpu)
echo "gpu_check: $PY (torch $TORCH_VERSION, $N_GPUS GPU(s)), device $DEVICE, logs in $OUT"
[ "$MODE" = gpu ] && command -v nvidia-smi >/dev/null 2>&1 &&
    nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv,noheader \
        | tee "$OUT/gpus.txt"

# ---- steps ---------------------------------------------------------------------------------
declare -a STEPS=() RESULTS=()
step() {   # step NAME TIMEOUT_S COMMAND...: run it, log it, remember how it ended
    local name="$1" limit="$2"; shift 2
    echo "== $name: $*"
    local start=$SECONDS
    timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
    local rc=$?
    local summary
    summary="$(grep -E '^[0-9]+ (passed|failed)|^=+ .*(passed|failed|error)' "$OUT/$name.log" \
               | tail -1 | sed 's/=//g; s/^ *//; s/ *$//')"
    [ -z "$summary" ] && summary="$(grep -E 'ratio|tok/s' "$OUT/$name.log" | tr '\n' ';' \
                                    | sed 's/  */ /g' | cut -c1-400)"
    [ $rc -eq 124 ] && summary="TIMED OUT after ${limit}s; $summary"
    STEPS+=("$name") RESULTS+=("rc=$rc ($((SECONDS - start)) s) $summary")
    echo "   rc=$rc, $((SECONDS - start)) s: ${summary:0:200}"
}

MATRIX_K=()
[ "$QUICK" = 1 ] && MATRIX_K=(-k "GPT2LMHead or LlamaForCausalLM or Gemma2 or Mixtral or OPTFor or Qwen2Moe")
PYTEST=("$PY" -m pytest -q -p no:cacheprovider -o addopts= --timeout 600)

HOOKWIRE_TEST_DEVICE=$DEVICE step matrix-fp32 5400 \
    "${PYTEST[@]}" tests/test_families.py "${MATRIX_K[@]}"
HOOKWIRE_TEST_DEVICE=$DEVICE HOOKWIRE_TEST_DTYPE=bfloat16 step matrix-bf16 5400 \
    "${PYTEST[@]}" tests/test_families.py "${MATRIX_K[@]}"
if [ "$MODE" = cpu ] || [ "${N_GPUS:-0}" -ge 2 ]; then
    HOOKWIRE_TEST_DEVICE=$DEVICE HOOKWIRE_TEST_DEVICE_MAP=split step matrix-split 5400 \
        "${PYTEST[@]}" tests/test_families.py "${MATRIX_K[@]}"
else
    STEPS+=("matrix-split") RESULTS+=("not run: one GPU (a split needs two)")
fi
step sharded 1800 "${PYTEST[@]}" tests/test_sharded_model.py tests/test_devices.py

REPEATS=$([ "$QUICK" = 1 ] && echo 2 || echo 10)
# On the CPU check, the benchmarks' plumbing on tiny-gpt2 (gpt2-small would take minutes).
BENCH_MODEL=$([ "$MODE" = cpu ] && echo tiny-gpt2 || echo gpt2-small-random)
BENCH=(--device "$DEVICE" --model "$BENCH_MODEL")
step bench-tl 1800 "$PY" bench/bench_tl_remote.py "${BENCH[@]}" --repeats "$REPEATS" \
    --json "$OUT/bench_tl.json"
step bench-pyvene 1800 "$PY" bench/bench_pyvene_remote.py "${BENCH[@]}" \
    --repeats "$REPEATS" --layers "$([ "$MODE" = cpu ] && echo 0,1 || echo 0,6,11)" \
    --json "$OUT/bench_pyvene.json"
step bench-generate 1800 "$PY" bench/bench_generate.py "${BENCH[@]}" \
    --repeats "$([ "$QUICK" = 1 ] && echo 2 || echo 7)" \
    --tokens "$([ "$QUICK" = 1 ] && echo 8 || echo 32)" --json "$OUT/bench_generate.json"
if [ "$MODE" = gpu ]; then   # the same in bfloat16, the dtype models are served in on GPUs
    step bench-tl-bf16 1800 "$PY" bench/bench_tl_remote.py "${BENCH[@]}" --dtype bfloat16 \
        --repeats "$REPEATS" --json "$OUT/bench_tl_bf16.json"
fi

# ---- summary -------------------------------------------------------------------------------
echo
echo "== gpu_check summary ($MODE, $DEVICE, torch $TORCH_VERSION, $N_GPUS GPU(s); logs: $OUT)"
for i in "${!STEPS[@]}"; do
    printf '  %-15s %s\n' "${STEPS[$i]}" "${RESULTS[$i]}"
done | tee "$OUT/summary.txt"
# Exit 1 when any step failed (its rc is not 0).
if grep -q "^  [^ ]* *rc=[1-9]" "$OUT/summary.txt"; then exit 1; fi
