#!/usr/bin/env bash
# The main job's data (studies/small-scale/README.md, "The default benchmark's data"): the main job's
# recipe (tiny-cpu, 100 steps: 4 "epochs" of 25, batched colour) on the built-in data drawn in
# random colours and in fixed colours (the same scenes), two seeds each, with the teacher's
# k-NN (2,000-image bank, 1,000 test images) at step 0 and every 25 steps.
# Usage: bash studies/small-scale/data_colours.sh   (prints one line of k-NN per run at the end)
# A finished run (its teacher_backbone.safetensors exists) is skipped.
set -euo pipefail
{
cd "$(dirname "$0")/../.."
source studies/smoke.sh  # SMOKE=1: tiny data, a few steps (tests/test_scripts.py)
OUT=${STUDY_DIR:-runs/study-colours}
N=2000; M=1000; [[ ${SMOKE:-0} == 1 ]] && { N=64; M=32; }
mkdir -p "$(dirname "$OUT")"
for colours in random fixed; do
  python run_pipeline.py prepare-data --source synthetic --colours $colours \
    --out "$OUT-data/$colours-32" --num-samples $N --num-test-samples $M
done
for seed in 0 1; do
  for colours in random fixed; do
    name=$colours-s$seed
    if [[ -f "$OUT/$name/teacher_backbone.safetensors" ]]; then echo "$name: done"; continue; fi
    python run_pipeline.py pretrain-local --preset tiny-cpu data.path="$OUT-data/$colours-32" \
      train.output_dir=$OUT train.run_name=$name train.seed=$seed data.colour_on=batch \
      train.steps_per_epoch=25 train.epochs=4 train.knn_every_epochs=1 \
      train.knn_train_samples=2000 train.knn_test_samples=1000 \
      tracking.log_images_every_epochs=0 $TINY > "$OUT-$name.log" 2>&1
  done
done
python - "$OUT" <<'PY'
import json, sys
from pathlib import Path
for m in sorted(Path(sys.argv[1]).glob("*/metrics.jsonl")):
    knn = [100 * r["knn_top1"] for r in map(json.loads, m.read_text().splitlines()) if "knn_top1" in r]
    print(f"{m.parent.name}: k-NN at steps 0, 25, ..., 100: {', '.join(f'{k:.1f}' for k in knn)}"
          f" (last - init {knn[-1] - knn[0]:+.1f})")
PY
exit
}
