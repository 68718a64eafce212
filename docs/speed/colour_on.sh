#!/usr/bin/env bash
# Training images/s with the colour augmentation per crop (data.colour_on=image, torchvision in
# the loader worker) against per batch (data.colour_on=batch), on CIFAR-10, back to back and
# alternating, each a fresh 240-step pretrain-local run with one loader worker and no monitor.
# Recipes: the tiny-cpu preset (8 x 8 patch grid) and study trial AH's (8-pixel patches).
# Usage: [ROUNDS=N] bash docs/speed/colour_on.sh   (one round: about 8 minutes on 2 cores; run it alone)
set -euo pipefail
cd "$(dirname "$0")/../.."
source studies/smoke.sh  # SMOKE=1: tiny data, a few steps (tests/test_scripts.py)
OUT=${STUDY_DIR:-runs/colour-on}
DATA=${STUDY_DATA:-data/cifar10}
python run_pipeline.py prepare-data --source cifar10 --from "$CIFAR10" --out "$DATA" > /dev/null
COMMON="data.path=$DATA train.output_dir=$OUT train.steps_per_epoch=240 train.epochs=1
  train.knn_every_epochs=0 train.log_every_steps=240 data.num_workers=1"
PATCH8="--config studies/small-scale/study-base.yaml optim.lr=2e-3 model.drop_path=0
  model.out_dim=256 model.depth=4 data.local_crops_number=2 loss.warmup_teacher_temp=0.02
  loss.teacher_temp=0.02 loss.warmup_teacher_patch_temp=0.02 loss.teacher_patch_temp=0.02
  optim.warmup_epochs=0.25 optim.freeze_last_layer=0 model.patch_size=8"
for recipe in tiny-cpu patch8; do
  if [[ $recipe == tiny-cpu ]]; then args="--preset tiny-cpu"; else args=$PATCH8; fi
  for round in $(seq "${ROUNDS:-1}"); do
    for on in image batch; do
      rm -rf "$OUT/$recipe-$on-$round"
      # shellcheck disable=SC2086
      rate=$(python run_pipeline.py pretrain-local $args $COMMON train.run_name=$recipe-$on-$round \
        data.colour_on=$on $TINY 2>&1 | grep -o '[0-9.]* img/s' | tail -1)
      echo "$recipe colour_on=$on round $round: $rate"
    done
  done
done
