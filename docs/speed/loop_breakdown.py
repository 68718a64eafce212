"""Where a training step's time goes with one loader worker: waiting for the batch, finishing it
(data.colour_on=batch: the colour step in the training process) and the model step, per batch,
after 20 warm-up steps (half the steps if fewer than 40). The recipe is study trial AH's (studies/small-scale/study.sh) on CIFAR-10.

Usage: PYTHONPATH=. python docs/speed/loop_breakdown.py image|batch [WORKERS] [STEPS]
``STUDY_DATA`` names the prepared CIFAR-10 (default data/cifar10); with SMOKE=1
(tests/test_scripts.py) the model has one block and the batch 8 images.
"""
from __future__ import annotations

import os
import sys
import time

import torch

from attmask.config import load_config
from attmask.data.shards import load_dataset
from attmask.data.stream import train_batches
from attmask.data.transforms import pretraining_transform
from attmask.engine import Engine

AH = ["optim.lr=2e-3", "model.drop_path=0", "model.out_dim=256", "model.depth=4",
      "data.local_crops_number=2", "loss.warmup_teacher_temp=0.02", "loss.teacher_temp=0.02",
      "loss.warmup_teacher_patch_temp=0.02", "loss.teacher_patch_temp=0.02",
      "optim.warmup_epochs=0.25", "model.patch_size=8"]
SMOKE = ["model.depth=1", "train.batch_size_per_worker=8", "data.shuffle_buffer=16"]


def main() -> None:
    colour_on = sys.argv[1]
    workers = int(sys.argv[2]) if len(sys.argv) > 2 else 1
    steps = int(sys.argv[3]) if len(sys.argv) > 3 else 100
    warmup = min(20, steps // 2)
    cfg = load_config(path="studies/small-scale/study-base.yaml", overrides=AH + [
        f"data.path={os.environ.get('STUDY_DATA', 'data/cifar10')}",
        f"data.colour_on={colour_on}", f"data.num_workers={workers}",
        f"train.steps_per_epoch={steps}", "train.epochs=1"]
        + (SMOKE if os.environ.get("SMOKE") == "1" else []))
    engine = Engine(cfg, steps_per_epoch=steps, device=torch.device("cpu"))
    crops = pretraining_transform(cfg)
    batches = iter(train_batches(load_dataset(cfg.data.path), cfg, epoch=0, steps=steps))
    spent = {"wait": 0.0, "finish": 0.0, "step": 0.0}
    for i in range(steps):
        t0 = time.perf_counter()
        batch = next(batches)
        t1 = time.perf_counter()
        global_crops, local_crops = crops.finish(batch, engine.device)
        t2 = time.perf_counter()
        engine.train_step(global_crops, local_crops)
        t3 = time.perf_counter()
        if i >= warmup:
            for key, dt in zip(spent, (t1 - t0, t2 - t1, t3 - t2)):
                spent[key] += dt
    n = steps - warmup
    per_batch = {k: 1000 * v / n for k, v in spent.items()}
    rate = n * cfg.train.batch_size_per_worker / sum(spent.values())
    print(f"colour_on={colour_on} workers={workers}: " + ", ".join(
        f"{k} {v:.1f} ms" for k, v in per_batch.items()) + f" per batch; {rate:.0f} img/s")


if __name__ == "__main__":  # the loader's workers start from a forkserver that imports this
    main()
