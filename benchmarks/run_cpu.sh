#!/usr/bin/env bash
# Every CPU benchmark at its full sweep, one after another (never in parallel: 2 cores), with logs.
# Usage: benchmarks/run_cpu.sh [log dir]   (run with the project venv active, on a quiet machine)
set -euo pipefail
cd "$(dirname "$0")/.."
logs=${1:-benchmarks/results/cpu/logs}
mkdir -p "$logs"
export PYTHONPATH=${PYTHONPATH:-python:.}
for b in hard_concrete masked_attention masked_ffn masked_layer_norm cpu_linear runtime train_step; do
  echo "=== bench_$b $(date +%T)"
  python "benchmarks/bench_$b.py" 2>&1 | tee "$logs/bench_$b.log" | tail -25
done
