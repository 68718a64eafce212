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
from typing import TYPE_CHECKING, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.transforms import v2

if TYPE_CHECKING:
    from attmask.models.vit import MaskedViT


@dataclass
class ProbeResult:
    model: nn.Linear
    val_top1: float
    epoch: int  # selected epoch, 1-based (LBFGS: iterations run)
    solver: str = "sgd"
    l2: float = 0.0  # LBFGS: the selected L2 penalty
    converged: bool = True  # LBFGS: stopped by its tolerance, not by its iteration cap
    lr: float = 0.0  # the official protocol: the learning rate chosen on val


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


def train_probe_lbfgs(features: torch.Tensor, labels: torch.Tensor, num_classes: int, *,
                      l2_grid: tuple[float, ...] = (1e-5, 1e-4, 1e-3, 1e-2),
                      max_iter: int = 500, val_fraction: float = 0.1, seed: int = 0
                      ) -> ProbeResult:
    """Multinomial logistic regression solved to convergence (full-batch L-BFGS with a strong
    Wolfe line search) for each L2 penalty of ``l2_grid``; the penalty is chosen on the same
    validation split :func:`train_probe` carves. For inputs on which a fixed SGD schedule stops
    short of its optimum (raw pixels: thousands of unscaled dimensions), so a baseline is not
    understated by an unconverged probe. Features are z-scored with the training statistics
    and the returned layer is folded back to apply to raw features."""
    train_idx, val_idx = carve_validation(labels, val_fraction, seed)
    x_all = features.double()
    mean, std = x_all[train_idx].mean(0), x_all[train_idx].std(0).clamp_min(1e-6)
    x = (x_all - mean) / std
    x_train, y_train = x[train_idx], labels[train_idx]
    x_val, y_val = x[val_idx], labels[val_idx]
    best: Optional[tuple[float, float, torch.Tensor, torch.Tensor, int]] = None
    for l2 in l2_grid:
        weight = torch.zeros(num_classes, x.shape[1], dtype=torch.float64, requires_grad=True)
        bias = torch.zeros(num_classes, dtype=torch.float64, requires_grad=True)
        opt = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=max_iter,
                                tolerance_grad=1e-6, tolerance_change=1e-10,
                                line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            loss = F.cross_entropy(x_train @ weight.T + bias, y_train) + l2 * weight.pow(2).sum()
            loss.backward()
            return loss

        opt.step(closure)
        iterations = opt.state[opt._params[0]]["n_iter"]
        with torch.no_grad():
            val = (float(((x_val @ weight.T + bias).argmax(1) == y_val).float().mean())
                   if len(val_idx) else 0.0)
        if best is None or val > best[0]:
            best = (val, l2, weight.detach(), bias.detach(), iterations)
    assert best is not None  # one entry per l2 value, and there is at least one
    val, l2, weight, bias, iterations = best
    model = nn.Linear(features.shape[1], num_classes)
    with torch.no_grad():  # w (x - m) / s + b = (w / s) x + (b - w m / s)
        model.weight.copy_((weight / std).float())
        model.bias.copy_((bias - (weight / std) @ mean).float())
    return ProbeResult(model, val, iterations, solver="lbfgs", l2=l2,
                       converged=iterations < max_iter)


OFFICIAL_LRS = (0.001, 0.003, 0.01, 0.03, 0.1)  # base LRs at batch 256, scaled linearly


def train_probe_official(backbone: MaskedViT, train_batches, val_features: torch.Tensor,
                         val_labels: torch.Tensor, num_classes: int, *, n_last_blocks: int,
                         image_size: int, epochs: int = 100,
                         lrs: tuple[float, ...] = OFFICIAL_LRS, batch_size: int = 128,
                         seed: int = 0, device: torch.device | None = None) -> ProbeResult:
    """The official linear evaluation (DINO ``eval_linear.py``, iBOT's LR sweep): a linear
    layer on the frozen [CLS] of the last ``n_last_blocks`` blocks, trained on a random resized
    crop and flip of every training image at every epoch (SGD, momentum 0.9, no weight decay,
    cosine schedule, LR scaled by ``batch_size`` / 256), one head per learning rate of ``lrs``
    on the same features. Unlike the official code, which keeps the best *test* accuracy over
    LRs and epochs, the LR and the epoch are chosen on ``val_features`` (the held-out ``val``
    split, centre views), and the test set is scored once, by the caller, with the returned head.

    ``train_batches()`` yields EvalStream batches of ``image_size`` px (normalised centre
    views); the crops are taken from those (resizing commutes with the per-channel
    normalisation)."""
    device = device or next(backbone.parameters()).device
    torch.manual_seed(seed)
    augment = v2.Compose([v2.RandomResizedCrop(image_size, antialias=True),
                          v2.RandomHorizontalFlip()])
    dim = backbone.embed_dim * n_last_blocks
    heads, optimizers, schedulers = [], [], []
    for lr in lrs:
        head = nn.Linear(dim, num_classes).to(device)
        nn.init.normal_(head.weight, std=0.01)
        nn.init.zeros_(head.bias)
        opt = torch.optim.SGD(head.parameters(), lr=lr * batch_size / 256, momentum=0.9,
                              weight_decay=0.0)
        heads.append(head)
        optimizers.append(opt)
        schedulers.append(torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs))
    val_features, val_labels = val_features.to(device), val_labels.to(device)
    best = ProbeResult(nn.Linear(dim, num_classes), -1.0, 0, solver="sgd-augmented")
    for epoch in range(1, epochs + 1):
        for batch in train_batches():
            images = torch.stack([augment(img) for img in batch["image"]]).to(device)
            with torch.no_grad():
                feats = backbone.cls_features(images, n_last_blocks).float()
            labels = batch["label"].to(device)
            for head, opt in zip(heads, optimizers):
                loss = F.cross_entropy(head(feats), labels)
                opt.zero_grad()
                loss.backward()
                opt.step()
        for lr, head, scheduler in zip(lrs, heads, schedulers):
            scheduler.step()
            val = accuracy(head, val_features, val_labels)
            if val > best.val_top1:
                best = ProbeResult(copy.deepcopy(head).cpu(), val, epoch,
                                   solver="sgd-augmented", lr=lr)
    return best
