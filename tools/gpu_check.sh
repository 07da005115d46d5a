#!/usr/bin/env bash
# One-shot GPU check for a lent machine (issue 19): at most ~6 minutes, everything under $OUT, a
# one-screen summary at the end (also $OUT/summary.txt). Run from the repository root:
#
#     OUT=/some/dir bash tools/gpu_check.sh          # GPU_CHECK_BUDGET=seconds (default 345)
#
# Stages, each under its own timeout (capped by what is left of the budget, so one hang cannot eat
# the rest): build cofi against this machine's own torch (setup.py build_ext --inplace, COFI_CUDA=1,
# TORCH_CUDA_ARCH_LIST from the visible GPU, MAX_JOBS=16); the GPU tests (tests/gpu and every
# `cuda`-marked test); a tiny end-to-end pruning run; `cofi bench` in float32 and bfloat16 (cofi's
# backends vs the eager reference and SDPA on all heads); compute-sanitizer memcheck on
# tools/gpu_native_once.py (every native kernel once). Missing Python packages (no network there)
# skip the stages that need them, with the reason. Files (<= 8, flat, as the lent machine returns):
# summary.txt build.log tests.log e2e.log bench.txt bench_float32.json bench_bfloat16.json sanitizer.log
# tools/gpu_results.py copies them into benchmarks/results/<device-name>/.
set -u -o pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT" || exit 2
OUT=${OUT:-$ROOT/out/gpu_check}
mkdir -p "$OUT"
PY=${PY:-python3}
BUDGET=${GPU_CHECK_BUDGET:-345}
START=$(date +%s)
export PYTHONPATH="$ROOT/python:$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
unset TRITON_INTERPRET COFI_BACKEND
SUMMARY=()

note() { SUMMARY+=("$*"); echo "== $*"; }

# run_stage NAME CAP LOGFILE CMD...: run CMD with the smaller of CAP and the budget left (minus 10 s
# for the summary); records "NAME: ok|FAILED (rc)|TIMEOUT|skipped (...) in Ns".
run_stage() {
    local name=$1 cap=$2 log=$3
    shift 3
    local left=$((BUDGET - ($(date +%s) - START) - 10))
    local t=$((cap < left ? cap : left))
    if ((t < 10)); then
        note "$name: skipped (no time left of the ${BUDGET} s budget)"
        return 1
    fi
    local t0 rc
    t0=$(date +%s)
    echo "== $name (timeout ${t} s): $*" | tee -a "$log"
    timeout --kill-after=5 "$t" "$@" >>"$log" 2>&1
    rc=$?
    local dt=$(($(date +%s) - t0))
    case $rc in
        0) note "$name: ok in ${dt} s" ;;
        124 | 137) note "$name: TIMEOUT after ${dt} s (cap ${t} s; see $(basename "$log"))" ;;
        *) note "$name: FAILED (rc $rc) in ${dt} s (see $(basename "$log"))" ;;
    esac
    return $rc
}

have_py() { "$PY" -c "import importlib.util as u, sys; sys.exit(0 if u.find_spec('$1') else 1)" 2>/dev/null; }

# ---------------------------------------------------------------- environment
{
    nvidia-smi --query-gpu=name,memory.total,driver_version,compute_cap --format=csv,noheader 2>&1 || true
    "$PY" - <<'EOF' 2>&1
import importlib.util as u, platform, torch
print("python", platform.python_version(), "| torch", torch.__version__, "CUDA", torch.version.cuda,
      "| cuda available", torch.cuda.is_available())
for m in ("triton", "transformers", "safetensors", "scipy", "yaml", "pytest", "hypothesis", "ninja", "datasets"):
    spec = u.find_spec(m)
    v = "MISSING"
    if spec:
        try:
            v = getattr(__import__(m), "__version__", "present")
        except Exception as e:  # noqa: BLE001
            v = f"import fails: {type(e).__name__}"
    print(f"  {m}: {v}")
EOF
} >"$OUT/build.log"
cat "$OUT/build.log"
DEVICE=$("$PY" -c "import torch; print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'none')" 2>/dev/null)
ARCH=$("$PY" -c "import torch; c = torch.cuda.get_device_capability(0); print(f'{c[0]}.{c[1]}')" 2>/dev/null)
note "device: ${DEVICE:-none} (sm ${ARCH:-?}); $(grep -m1 '^python' "$OUT/build.log")"
missing=$(grep -E ': MISSING|import fails' "$OUT/build.log" | sed 's/^ *//; s/:.*//' | tr '\n' ' ')
[ -n "$missing" ] && note "python packages missing here: $missing(stages needing them are skipped)"
if [ "${DEVICE:-none}" = none ]; then
    note "no CUDA device visible to torch: nothing to check"
    printf '%s\n' "${SUMMARY[@]}" | tee "$OUT/summary.txt"
    exit 1
fi

# ---------------------------------------------------------------- build against this machine's torch
have_py ninja || have_py ninja_syntax || echo "ninja missing: setuptools builds serially" >>"$OUT/build.log"
if run_stage "build (sm_$ARCH, this machine's torch)" 200 "$OUT/build.log" \
    env COFI_CUDA=1 MAX_JOBS=16 TORCH_CUDA_ARCH_LIST="$ARCH" CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}" \
    "$PY" setup.py build_ext --inplace; then
    "$PY" - >>"$OUT/build.log" 2>&1 <<'EOF'
from cofi.ops import backends
b = backends()
bad = {op: r["native"]["cuda"] for op, r in b.items() if r["native"]["cuda"] != "available"}
print("native CUDA kernels:", "all available" if not bad else f"MISSING {bad}")
EOF
    note "$(grep -m1 '^native CUDA kernels' "$OUT/build.log" || echo 'native CUDA kernels: backends() failed (see build.log)')"
fi

# ---------------------------------------------------------------- GPU tests
PYTEST=("$PY" -m pytest -o addopts= --import-mode=importlib -q -rfEs -p no:cacheprovider)
have_py pytest_timeout && PYTEST+=(--timeout 120)
if have_py pytest; then
    run_stage "GPU tests (tests/gpu + cuda-marked)" 110 "$OUT/tests.log" \
        "${PYTEST[@]}" tests/gpu tests/ops tests/kernels -m "gpu or cuda" -k "not tiny_pruning" \
        --continue-on-collection-errors
    note "  tests: $(grep -E '^(=+ )?[0-9]+ (passed|failed|skipped|error)' "$OUT/tests.log" | tail -1)"
    grep -E '^(FAILED|ERROR) ' "$OUT/tests.log" | head -8 | while read -r l; do note "  $l"; done
    run_stage "tiny pruning run (fp32, bf16 autocast)" 60 "$OUT/e2e.log" \
        "${PYTEST[@]}" -s tests/gpu/test_gpu_training.py -k tiny_pruning
    grep -E '^(fp32|bf16): ' "$OUT/e2e.log" | while read -r l; do note "  $l"; done
else
    note "GPU tests and pruning run: skipped (pytest missing)"
fi

# ---------------------------------------------------------------- benchmarks
for dt in float32 bfloat16; do
    run_stage "cofi bench $dt" 60 "$OUT/bench.txt" \
        "$PY" -m cofi.cli bench --device cuda --dtype "$dt" --quick --min-run-time 0.1 --json "$OUT/bench_$dt.json"
done
if [ -s "$OUT/bench_bfloat16.json" ]; then
    "$PY" - "$OUT/bench_float32.json" "$OUT/bench_bfloat16.json" <<'EOF' | while read -r l; do note "  $l"; done
import json, sys
for path in sys.argv[1:]:
    try:
        rows = json.load(open(path))["rows"]
    except Exception:  # noqa: BLE001
        continue
    for r in rows:
        if r["op"] == "masked_attention" and r["provider"] != "reference" and "p50_ms" in r \
                and r["shape"]["live_frac"] == 1.0:
            print(f"attn {r['dtype']:8s} {r['case'][:16]:16s} {r['mode']:7s} {r['provider']:9s} "
                  f"{r['p50_ms']:7.3f} ms  vs SDPA-all-heads {r.get('vs_sdpa') or 0:.2f}x  "
                  f"vs eager {r.get('vs_reference') or 0:.2f}x")
EOF
fi

# ---------------------------------------------------------------- compute-sanitizer
SAN=$(command -v compute-sanitizer || ls /usr/local/cuda/bin/compute-sanitizer 2>/dev/null || true)
if [ -z "$SAN" ]; then
    note "compute-sanitizer: skipped (not found)"
else
    run_stage "compute-sanitizer memcheck (every native kernel once)" 90 "$OUT/sanitizer.log" \
        env PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$SAN" --tool memcheck --error-exitcode 9 --print-limit 30 \
        "$PY" tools/gpu_native_once.py --device cuda
    note "  $(grep -E 'ERROR SUMMARY' "$OUT/sanitizer.log" | tail -1) | $(grep -E 'native calls ok' "$OUT/sanitizer.log" | tail -1)"
fi

# ---------------------------------------------------------------- summary
note "total $(($(date +%s) - START)) s of ${BUDGET} s; files in $OUT"
{
    echo "=== gpu_check summary ($(date -u +%Y-%m-%dT%H:%M:%SZ))"
    printf '%s\n' "${SUMMARY[@]}"
} >"$OUT/summary.txt"
echo
cat "$OUT/summary.txt"
grep -qE 'FAILED|TIMEOUT|MISSING \{' "$OUT/summary.txt" && exit 1
exit 0
