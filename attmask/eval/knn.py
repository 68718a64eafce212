"""Weighted k-NN classifier on L2-normalised features (Wu et al. 2018; DINO's protocol).

Cosine similarity to the memory bank, the top-k neighbours vote with weight exp(sim / T),
T = 0.07. The similarity matrix is computed in chunks of test samples, so memory stays bounded
for large banks.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from attmask.eval.results import HITS_K, encode_hits


@torch.no_grad()
def knn_classify(train_features: torch.Tensor, train_labels: torch.Tensor,
                 test_features: torch.Tensor, num_classes: int, k: int = 20,
                 temperature: float = 0.07, chunk: int = 1024) -> torch.Tensor:
    """Class scores (N_test, C) from the k nearest training features (k capped at the bank)."""
    bank = F.normalize(train_features.float(), dim=1)
    k = min(k, len(bank))
    scores = []
    for start in range(0, len(test_features), chunk):
        q = F.normalize(test_features[start:start + chunk].float(), dim=1)
        sim, idx = (q @ bank.T).topk(k, dim=1)
        weights = (sim / temperature).exp()
        votes = torch.zeros(len(q), num_classes, device=q.device)
        votes.scatter_add_(1, train_labels[idx], weights)
        scores.append(votes)
    return torch.cat(scores)


def topk_accuracy(scores: torch.Tensor, labels: torch.Tensor, k: int) -> float:
    k = min(k, scores.shape[1])
    hits = (scores.topk(k, dim=1).indices == labels[:, None]).any(dim=1)
    return hits.float().mean().item()


def knn_accuracy(train_features: torch.Tensor, train_labels: torch.Tensor,
                 test_features: torch.Tensor, test_labels: torch.Tensor, num_classes: int,
                 ks: Sequence[int] = (10, 20, 100, 200), temperature: float = 0.07,
                 chunk: int = 1024, test_keys: Optional[Sequence[str]] = None) -> dict[str, dict]:
    """``{"k20": {"top1": a, "top5": a, "n": test images}, ...}``, accuracies as fractions in
    [0, 1]; ``n`` lets a reader judge a difference against the test set's sampling error. With
    ``test_keys`` the ``k20`` entry also keeps which test images it got right
    (:func:`attmask.eval.results.encode_hits`), for comparing two models image by image."""
    out: dict[str, dict] = {}
    for k in ks:
        scores = knn_classify(train_features, train_labels, test_features, num_classes, k,
                              temperature, chunk)
        out[f"k{k}"] = {"top1": topk_accuracy(scores, test_labels, 1),
                        "top5": topk_accuracy(scores, test_labels, 5), "n": len(test_labels)}
        if test_keys is not None and k == HITS_K:
            top1 = scores.topk(1, dim=1).indices[:, 0]  # as topk_accuracy picks it
            hits = (top1 == test_labels.to(top1.device)).cpu().numpy()
            out[f"k{k}"].update(encode_hits(hits, test_keys))
    return out
