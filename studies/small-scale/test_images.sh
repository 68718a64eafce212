#!/usr/bin/env bash
# The main job's test images (studies/small-scale/README.md, "Test images, not runs"): how much of the main job's
# seed-to-seed spread comes from its test images. Trains the main job's three strategies for
# seeds 0-2 into a store of its own (the same weights as docs/results/archive/default/: one machine
# trains a seed bit for bit alike), evaluates each teacher with the k-NN on 10,000 test images
# of the same scenes, and prints each run's gain over init on the first 1,000 of them (the main
# job's test split before 2026-11-30) and on all 10,000. About 35 minutes on 2 CPU cores;
# rerunning skips what is done.
set -euo pipefail
{
cd "$(dirname "$0")/../.."
source studies/smoke.sh  # SMOKE=1: tiny data, a few steps (tests/test_scripts.py)
DATA=${STUDY_DATA:-data/study-fixed-10k}
OUT=${STUDY_DIR:-runs/study-test-images}
N=2000; M=10000; SEEDS=0-2; [[ ${SMOKE:-0} == 1 ]] && { N=64; M=32; SEEDS=0; TINY="--strategies random $TINY data.path=$DATA"; }
python run_pipeline.py prepare-data --source synthetic --colours fixed --out "$DATA" \
  --num-samples $N --num-test-samples $M
mkdir -p "$OUT"
# shellcheck disable=SC2086
python run_pipeline.py benchmark --preset default --seeds $SEEDS --reports "$OUT/reports" \
  ray.storage_path="$OUT/ray" train.output_dir="$OUT/out" tracking.uri="sqlite:///$(realpath "$OUT")/mlflow.db" $TINY > "$OUT.log" 2>&1  # state.pt of each run beside its report
for checkpoint in "$OUT"/reports/default/runs/*/state.pt; do
  run=$(basename "$(dirname "$checkpoint")")
  if [[ -f "$OUT/$run/results.json" ]]; then echo "$run: done"; continue; fi
  python run_pipeline.py evaluate --preset tiny-cpu --checkpoint "$checkpoint" --data "$DATA" \
    --suite knn --baselines init --out "$OUT/$run" > "$OUT/$run.log" 2>&1
done
PYTHONPATH=. python studies/small-scale/test_images.py "$OUT"
exit
}
