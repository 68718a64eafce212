"""The teacher's and the student's [CLS] k-NN of pretraining checkpoints, with the online monitor
of the recipe study (k = 20, 5,000-image bank, 2,000 test images, class-stratified, CIFAR-10).

    PYTHONPATH=. python docs/small-scale/student_knn.py CHECKPOINT.pt [...]

Runs that log ``train.knn_student=true`` record the same numbers while they train; this reads
them from the checkpoints of runs that did not.
"""
from __future__ import annotations

import sys

import torch

from attmask.config import load_config
from attmask.data.shards import load_dataset
from attmask.models.vit import build_backbone
from attmask.monitor import OnlineKnn
from attmask.runtime import load_checkpoint


def main(checkpoints: list[str]) -> None:
    torch.set_num_threads(1)
    cfg = load_config("tiny-cpu", overrides=["data.path=data/cifar10",
                                             "train.knn_train_samples=5000",
                                             "train.knn_test_samples=2000"])
    monitor = OnlineKnn(load_dataset(cfg.data.path), cfg)
    for path in checkpoints:
        state, scores = load_checkpoint(path), []
        for role in ("teacher", "student"):
            backbone = build_backbone(cfg.model).eval()
            backbone.load_state_dict({k.removeprefix("backbone."): v
                                      for k, v in state[role].items()
                                      if k.startswith("backbone.")})
            scores.append(f"{role} {100 * monitor(backbone)['knn_top1']:.1f} %")
        print(f"{path}: " + ", ".join(scores))


if __name__ == "__main__":
    main(sys.argv[1:])
