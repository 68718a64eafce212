"""The teacher's and the student's [CLS] k-NN of pretraining checkpoints, with the online monitor
of the recipe study (k = 20, 5,000-image bank, 2,000 test images, class-stratified, CIFAR-10).

    PYTHONPATH=. python studies/small-scale/student_knn.py CHECKPOINT.pt [...]

Runs that log ``train.knn_student=true`` record the same numbers while they train; this reads
them from the checkpoints of runs that did not. ``STUDY_DATA`` names the prepared CIFAR-10
(default ``data/cifar10``); with SMOKE=1 (tests/test_scripts.py) the bank is 40 images.
"""
from __future__ import annotations

import os
import sys

import torch

from attmask.config import load_config
from attmask.data.shards import load_dataset
from attmask.models.export import load_teacher
from attmask.models.vit import build_backbone
from attmask.monitor import OnlineKnn
from attmask.runtime import load_checkpoint


def main(checkpoints: list[str]) -> None:
    torch.set_num_threads(1)
    smoke = os.environ.get("SMOKE") == "1"
    cfg = load_config("tiny-cpu", overrides=[
        f"data.path={os.environ.get('STUDY_DATA', 'data/cifar10')}",
        f"train.knn_train_samples={40 if smoke else 5000}",
        f"train.knn_test_samples={20 if smoke else 2000}"])
    monitor = OnlineKnn(load_dataset(cfg.data.path), cfg)
    for path in checkpoints:
        teacher, run_cfg = load_teacher(path, cfg)  # the run's own architecture
        student = build_backbone(run_cfg.model, drop_path=0.0).eval()
        student.load_state_dict({k.removeprefix("backbone."): v
                                 for k, v in load_checkpoint(path)["student"].items()
                                 if k.startswith("backbone.")})
        scores = [f"{role} {100 * monitor(backbone)['knn_top1']:.1f} %"
                  for role, backbone in (("teacher", teacher), ("student", student))]
        print(f"{path}: " + ", ".join(scores))


if __name__ == "__main__":
    main(sys.argv[1:])
