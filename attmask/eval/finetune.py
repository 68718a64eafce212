"""Fine-tuning evaluation (the BEiT / iBOT protocol on a short schedule).

The whole backbone is trained end to end with a linear head on its [CLS] output, from the
evaluated weights: AdamW with layer-wise learning-rate decay (Bao et al., "BEiT", ICLR 2022;
used by iBOT and AttMask: the patch embedding and tokens get ``lr * decay^(L+1)``, block ``i``
``lr * decay^(L-i)``, the final norm and the head ``lr``), no weight decay on biases, norms and
tokens, a linear warm-up then cosine decay, label smoothing 0.1, random resized crops and flips.
The paper fine-tunes for 100-300 epochs with mixup, cutmix and RandAugment; this short schedule
(a few epochs, on an in-memory subset) is what a CPU budget allows, so its scores compare
checkpoints with each other, not with the paper's table.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.transforms import v2

from attmask.models.vit import MaskedViT


def layer_id(name: str, depth: int) -> int:
    """BEiT's layer index of a backbone parameter: 0 for the embedding, i+1 for block i,
    depth+1 for the final norm."""
    if name.startswith(("cls_token", "pos_embed", "patch_embed", "mask_token", "reg_token")):
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return depth + 1


def layer_decay_groups(backbone: MaskedViT, head: nn.Module, lr: float, decay: float,
                       weight_decay: float) -> list[dict]:
    """AdamW parameter groups with layer-wise learning rates (``lr_scale`` kept for the
    schedule) and no weight decay on 1-D parameters and tokens."""
    depth = len(backbone.blocks)
    groups: dict[tuple[int, bool], dict] = {}
    named = [*backbone.named_parameters(), *(("head." + n, p) for n, p in head.named_parameters())]
    for name, param in named:
        if not param.requires_grad:
            continue
        layer = depth + 1 if name.startswith("head.") else layer_id(name, depth)
        no_decay = param.ndim == 1 or name.endswith(("_token", "pos_embed"))
        scale = decay ** (depth + 1 - layer)
        group = groups.setdefault((layer, no_decay), {
            "params": [], "lr": lr * scale, "lr_scale": scale,
            "weight_decay": 0.0 if no_decay else weight_decay})
        group["params"].append(param)
    return list(groups.values())


def finetune(backbone: MaskedViT, train_images: torch.Tensor, train_labels: torch.Tensor,
             test_batches, num_classes: int, *, epochs: int = 3, lr: float = 1e-3,
             layer_decay: float = 0.75, weight_decay: float = 0.05, batch_size: int = 64,
             seed: int = 0, device: torch.device | None = None) -> dict:
    """Fine-tune a copy of ``backbone`` on normalised ``train_images`` (N, 3, S, S) and score
    top-1 on ``test_batches`` (EvalStream layout). The backbone passed in is left unchanged."""
    tuned = train_finetune(backbone, train_images, train_labels, num_classes, epochs=epochs,
                           lr=lr, layer_decay=layer_decay, weight_decay=weight_decay,
                           batch_size=batch_size, seed=seed, device=device)
    return {"top1": tuned.score(test_batches), "epochs": epochs, "steps": tuned.steps,
            "train_images": len(train_images), "lr": lr, "layer_decay": layer_decay,
            "last_loss": tuned.last_loss}


@dataclass
class FineTuned:
    model: MaskedViT
    head: nn.Linear
    steps: int
    last_loss: float

    @torch.no_grad()
    def score(self, batches) -> float:
        """Top-1 over ``batches`` (EvalStream layout)."""
        self.model.eval()
        device = next(self.model.parameters()).device
        correct = seen = 0
        for batch in batches:
            logits = self.head(self.model.cls_features(batch["image"].to(device)))
            correct += int((logits.argmax(1).cpu() == batch["label"]).sum())
            seen += len(batch["label"])
        return correct / max(seen, 1)


def train_finetune(backbone: MaskedViT, train_images: torch.Tensor, train_labels: torch.Tensor,
                   num_classes: int, *, epochs: int = 3, lr: float = 1e-3,
                   layer_decay: float = 0.75, weight_decay: float = 0.05, batch_size: int = 64,
                   seed: int = 0, device: torch.device | None = None) -> FineTuned:
    """The training half of :func:`finetune`: a fine-tuned copy of ``backbone`` and its head."""
    device = device or next(backbone.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # head init, drop path and the crops
    model = copy.deepcopy(backbone).to(device).train()
    model.requires_grad_(True)
    head = nn.Linear(model.embed_dim, num_classes).to(device)
    nn.init.trunc_normal_(head.weight, std=0.02)
    nn.init.zeros_(head.bias)
    optimizer = torch.optim.AdamW(layer_decay_groups(model, head, lr, layer_decay, weight_decay))
    size = train_images.shape[-1]
    augment = v2.Compose([v2.RandomResizedCrop(size, scale=(0.25, 1.0), antialias=True),
                          v2.RandomHorizontalFlip()])
    steps_per_epoch = math.ceil(len(train_images) / batch_size)
    total, warmup = epochs * steps_per_epoch, max(1, steps_per_epoch // 2)
    step, loss = 0, torch.tensor(float("nan"))
    for _ in range(epochs):
        order = torch.randperm(len(train_images), generator=generator)
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            images = torch.stack([augment(img) for img in train_images[idx]]).to(device)
            factor = (step + 1) / warmup if step < warmup else \
                0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))
            for group in optimizer.param_groups:
                group["lr"] = lr * group["lr_scale"] * factor
            with torch.enable_grad():  # also when a caller evaluates under no_grad
                logits = head(model.cls_features(images))
                loss = F.cross_entropy(logits, train_labels[idx].to(device), label_smoothing=0.1)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
            optimizer.step()
            step += 1
    return FineTuned(model, head, step, float(loss.detach()))
