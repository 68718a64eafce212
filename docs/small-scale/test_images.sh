#!/usr/bin/env bash
# Issue 10, section 4 (docs/small-scale.md, "Test images, not runs"): how much of the main job's
# seed-to-seed spread comes from its test images. Evaluates the committed checkpoints of
# docs/results/default/ (seeds 0-2) with the k-NN on 10,000 test images of the same scenes,
# then prints each run's gain over init on the first 1,000 of them (the main job's test split
# before 2026-11-30) and on all 10,000. About 1-2 minutes per checkpoint on 2 CPU cores; a run
# already evaluated is skipped.
set -euo pipefail
{
cd "$(dirname "$0")/../.."
DATA=${STUDY_DATA:-data/study-fixed-10k}
OUT=${STUDY_DIR:-runs/study-test-images}
python run_pipeline.py prepare-data --source synthetic --colours fixed --out "$DATA" \
  --num-samples 2000 --num-test-samples 10000
mkdir -p "$OUT"
for checkpoint in docs/results/default/runs/*/state.pt; do
  run=$(basename "$(dirname "$checkpoint")")
  if [[ -f "$OUT/$run/results.json" ]]; then echo "$run: done"; continue; fi
  python run_pipeline.py evaluate --preset tiny-cpu --checkpoint "$checkpoint" --data "$DATA" \
    --suite knn --baselines init --out "$OUT/$run" > "$OUT/$run.log" 2>&1
done
PYTHONPATH=. python docs/small-scale/test_images.py "$OUT"
exit
}
