"""One seed's paired k-NN difference between two finished benchmark runs, with the 95 % interval
that the test images' sampling alone puts on it.

    PYTHONPATH=. python docs/small-scale/paired_knn.py RUN_A RUN_B [DATA]

RUN_A and RUN_B are two runs' evaluation folders in a report folder
(``REPORTS/NAME/runs/STRATEGY-sSEED``), with the ``state.pt`` and ``features/`` their evaluation
left there (not committed); DATA defaults to ``data/cifar10``. Prints B minus A in k-NN top-1
(k = 20, T = 0.07, the evaluation's protocol) over the same test images, and a normal-
approximation interval from the per-image differences (each image scores -1, 0 or +1).

The report gives no interval for a single seed, rightly: another seed's pair of networks can
differ by more than this. This interval holds both trained networks fixed and asks only whether
they differ on this test set; it is the smaller part of a strategy comparison's noise.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

from attmask.eval.knn import knn_classify
from attmask.eval.suite import EvalOptions, Evaluator


def per_image_hits(run: Path, data: str) -> tuple[torch.Tensor, list[str]]:
    """1.0 where the run's k-NN classifies a test image correctly (cached features are reused)."""
    options = EvalOptions()
    evaluator = Evaluator.from_checkpoint(run / "state.pt", data, cache_dir=run / "features",
                                          options=options, device=torch.device("cpu"))
    train = evaluator.features("train", options.knn_blocks)
    test = evaluator.features("test", options.knn_blocks)
    scores = knn_classify(train.features, train.labels, test.features, evaluator.num_classes, k=20)
    return (scores.argmax(1) == test.labels).float(), list(test.keys)


def main(run_a: str, run_b: str, data: str = "data/cifar10") -> None:
    hits_a, keys_a = per_image_hits(Path(run_a), data)
    hits_b, keys_b = per_image_hits(Path(run_b), data)
    if keys_a != keys_b:
        raise SystemExit("error: the two runs were evaluated on different test images")
    diff = 100 * (hits_b - hits_a)
    half = 1.96 * diff.std().item() / len(diff) ** 0.5
    print(f"{run_a}: k-NN top-1 {100 * hits_a.mean().item():.2f} %")
    print(f"{run_b}: k-NN top-1 {100 * hits_b.mean().item():.2f} %")
    print(f"B - A: {diff.mean().item():+.2f} points, 95 % interval from the test images alone "
          f"[{diff.mean().item() - half:+.2f}, {diff.mean().item() + half:+.2f}] "
          f"({len(diff)} images, {100 * (diff != 0).float().mean().item():.1f} % classified "
          "differently)")


if __name__ == "__main__":
    if len(sys.argv) not in (3, 4):
        raise SystemExit(__doc__)
    main(*sys.argv[1:])
