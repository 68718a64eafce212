"""Low-shot k-NN (AttMask's protocol): nu labelled images per class, 1-NN for nu = 1 and 20-NN
otherwise (k capped at the bank), mean and std over 5 disjoint splits of the training set."""
from __future__ import annotations

import statistics
from typing import Sequence

import torch

from attmask.eval.knn import knn_classify, topk_accuracy


def disjoint_splits(labels: torch.Tensor, nu: int, num_splits: int = 5,
                    seed: int = 0) -> list[torch.Tensor]:
    """``num_splits`` disjoint index sets with exactly ``nu`` images of every class.

    Raises ValueError naming the class when it has fewer than ``nu * num_splits`` images."""
    g = torch.Generator().manual_seed(seed)
    per_class = []
    for c in labels.unique().tolist():
        idx = (labels == c).nonzero()[:, 0]
        if len(idx) < nu * num_splits:
            raise ValueError(f"class {c} has {len(idx)} images; {num_splits} disjoint splits of "
                             f"{nu} per class need {nu * num_splits}")
        per_class.append(idx[torch.randperm(len(idx), generator=g)])
    return [torch.cat([idx[s * nu:(s + 1) * nu] for idx in per_class])
            for s in range(num_splits)]


def fewshot_knn(train_features: torch.Tensor, train_labels: torch.Tensor,
                test_features: torch.Tensor, test_labels: torch.Tensor, num_classes: int,
                shots: Sequence[int] = (1, 5, 10, 20), num_splits: int = 5,
                temperature: float = 0.07) -> dict[str, dict]:
    """``{"1": {"mean", "std", "splits"}, ...}``; a nu the data cannot serve is ``{"skipped"}``."""
    out: dict[str, dict] = {}
    for nu in shots:
        try:
            splits = disjoint_splits(train_labels, nu, num_splits)
        except ValueError as exc:
            out[str(nu)] = {"skipped": str(exc)}
            continue
        k = 1 if nu == 1 else 20
        accs = []
        for idx in splits:
            scores = knn_classify(train_features[idx], train_labels[idx], test_features,
                                  num_classes, k=k, temperature=temperature)
            accs.append(topk_accuracy(scores, test_labels, 1))
        out[str(nu)] = {"mean": statistics.fmean(accs), "std": statistics.pstdev(accs),
                        "splits": len(accs), "k": min(k, nu * num_classes)}
    return out
