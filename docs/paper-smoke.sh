#!/usr/bin/env bash
# Smoke run of the paper's benchmark preset (configs/benchmark/paper-20pct-in1k.yaml) at tiny
# size on a CPU: a generated, class-ordered image folder of 20 classes (train/ and val/, 48 px,
# each class its own colour and shape), sharded with the preset's own preparation command
# (--source imagefolder --per-class), then all five strategies pretrained and evaluated by the
# preset with overrides that shrink the model and point tracking and storage at a local folder.
# Usage: bash docs/paper-smoke.sh [WORKDIR]   (about 5-10 minutes on 2 cores)
set -euo pipefail
work="${1:-runs/paper-smoke}"
# SMOKE=1 (tests/test_scripts.py): one of the preset's five strategies
strategies=random,block,attmask_high,attmask_low,attmask_hint
[[ ${SMOKE:-0} == 1 ]] && strategies=attmask_high
mkdir -p "$work"
python - "$work/imgs" <<'PY'
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

root, rng = Path(sys.argv[1]), np.random.default_rng(0)
for split, n in (("train", 10), ("val", 4)):
    for c in range(20):  # class-ordered on disk: class_00/..., class_01/..., as ImageNet
        folder = root / split / f"class_{c:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(n):
            img = Image.new("RGB", (48, 48), tuple(int(v) for v in rng.integers(0, 80, 3)))
            colour = tuple(int(v) for v in (np.array([c * 12, 255 - c * 12, (c * 53) % 256])))
            x, y = (int(v) for v in rng.integers(4, 20, 2))
            box = (x, y, x + 20 + c % 5, y + 20 + c % 4)
            (ImageDraw.Draw(img).ellipse if c % 2 else ImageDraw.Draw(img).rectangle)(box, colour)
            img.save(folder / f"{i:03d}.png")
PY
python run_pipeline.py prepare-data --source imagefolder --from "$work/imgs" --per-class 8 \
    --out "$work/shards"
python run_pipeline.py benchmark --preset paper-20pct-in1k --reports "$work/reports" \
    --strategies "$strategies" \
    data.path="$work/shards" tracking.uri="sqlite:///$(realpath "$work")/mlflow.db" \
    ray.storage_path="$(realpath "$work")/ray" train.output_dir="$work/out" \
    ray.num_workers=1 ray.use_gpu=false ray.cpus_per_worker=1 train.precision=fp32 \
    model.arch=vit_tiny model.depth=2 model.image_size=32 model.local_image_size=16 \
    model.patch_size=4 model.out_dim=256 model.head_hidden_dim=128 model.head_bottleneck_dim=64 \
    train.batch_size_per_worker=16 train.epochs=2 data.local_crops_number=2 data.num_workers=0 \
    data.shuffle_buffer=64 optim.warmup_epochs=0 loss.warmup_teacher_temp_epochs=1 \
    train.knn_every_epochs=1 train.knn_train_samples=160 train.knn_test_samples=80
