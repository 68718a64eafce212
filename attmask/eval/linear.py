"""Linear probe on frozen features (DINO/AttMask protocol, on cached features).

SGD with momentum 0.9, no weight decay, cosine schedule, linear layer initialised N(0, 0.01).
Unlike the official code, which reports the best *test* accuracy over epochs, the epoch is
selected on a validation split carved from the training features, and the test set is scored
once, with the selected weights. The probe trains on features of one centre view per image (no
augmentation), which makes it cheap enough to run inside every benchmark.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class ProbeResult:
    model: nn.Linear
    val_top1: float
    epoch: int  # selected epoch, 1-based


def carve_validation(labels: torch.Tensor, fraction: float = 0.1,
                     seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Stratified split of training indices into (train, val): ``fraction`` of each class."""
    g = torch.Generator().manual_seed(seed)
    train, val = [], []
    for c in labels.unique():
        idx = (labels == c).nonzero()[:, 0]
        idx = idx[torch.randperm(len(idx), generator=g)]
        n_val = max(1, int(round(len(idx) * fraction))) if len(idx) > 1 else 0
        val.append(idx[:n_val])
        train.append(idx[n_val:])
    return torch.cat(train).sort().values, torch.cat(val).sort().values


def accuracy(model: nn.Module, features: torch.Tensor, labels: torch.Tensor) -> float:
    with torch.no_grad():
        return (model(features).argmax(1) == labels).float().mean().item()


def train_probe(features: torch.Tensor, labels: torch.Tensor, num_classes: int, *,
                epochs: int = 100, lr: float = 0.01, batch_size: int = 256,
                val_fraction: float = 0.1, seed: int = 0) -> ProbeResult:
    """Fit a linear classifier; returns the weights of the epoch with the best validation top-1."""
    train_idx, val_idx = carve_validation(labels, val_fraction, seed)
    torch.manual_seed(seed)
    model = nn.Linear(features.shape[1], num_classes)
    nn.init.normal_(model.weight, std=0.01)
    nn.init.zeros_(model.bias)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr * batch_size / 256, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs, eta_min=0)
    x_train, y_train = features[train_idx], labels[train_idx]
    x_val, y_val = features[val_idx], labels[val_idx]
    g = torch.Generator().manual_seed(seed)
    best = ProbeResult(copy.deepcopy(model), -1.0, 0)
    for epoch in range(1, epochs + 1):
        order = torch.randperm(len(x_train), generator=g)
        for start in range(0, len(order), batch_size):
            batch = order[start:start + batch_size]
            loss = F.cross_entropy(model(x_train[batch]), y_train[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        scheduler.step()
        val = accuracy(model, x_val, y_val) if len(val_idx) else 0.0
        if val > best.val_top1:
            best = ProbeResult(copy.deepcopy(model), val, epoch)
    return best


def confusion_matrix(model: nn.Module, features: torch.Tensor, labels: torch.Tensor,
                     num_classes: int) -> torch.Tensor:
    with torch.no_grad():
        pred = model(features).argmax(1)
    cm = torch.zeros(num_classes, num_classes, dtype=torch.long)
    cm.index_put_((labels, pred), torch.ones_like(labels), accumulate=True)
    return cm
