#!/usr/bin/env bash
# The recipe study behind docs/small-scale.md: short pretrain-local runs on CIFAR-10 at 32 px,
# each a complete run (its own warm-up and cosine decay), with the teacher's online k-NN
# (k = 20, 5,000-image bank, 2,000 test images) at step 0 and after every 80-step "epoch".
# Usage: bash docs/small-scale/study.sh [TRIAL ...]   (no argument: every trial below)
# A finished trial (its teacher_backbone.safetensors exists) is skipped, so rerunning continues.
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${STUDY_DIR:-runs/study}
python run_pipeline.py prepare-data --source cifar10 --from ../shared/data/cifar10 --out data/cifar10

COMMON="data.path=data/cifar10 train.output_dir=$OUT train.steps_per_epoch=80 train.epochs=3
  train.knn_every_epochs=1 train.knn_train_samples=5000 train.knn_test_samples=2000
  train.log_every_steps=20 optim.warmup_epochs=0.5 loss.warmup_teacher_temp_epochs=1
  optim.freeze_last_layer=0 data.num_workers=1"

# Each trial changes a few keys of the tiny-cpu preset (see docs/small-scale.md for why).
declare -A TRIALS=(
  [A-tinycpu]=""
  [B-ibot-lr1.5e-3]="optim.lr=6e-3 model.drop_path=0 model.out_dim=1024"
  [E-ibot-lr1.5e-3-temp0.04]="optim.lr=6e-3 model.drop_path=0 model.out_dim=1024
    loss.teacher_temp=0.04 loss.teacher_patch_temp=0.04"
)
ORDER=(A-tinycpu B-ibot-lr1.5e-3 E-ibot-lr1.5e-3-temp0.04)
for name in "${@:-${ORDER[@]}}"; do
  if [[ -f "$OUT/$name/teacher_backbone.safetensors" ]]; then echo "$name: done"; continue; fi
  rm -rf "${OUT:?}/$name"
  echo "$name: ${TRIALS[$name]}"
  # shellcheck disable=SC2086
  python run_pipeline.py pretrain-local --preset tiny-cpu $COMMON train.run_name=$name \
    ${TRIALS[$name]} > "$OUT/$name.log" 2>&1 || { echo "$name failed"; tail -3 "$OUT/$name.log"; }
done
