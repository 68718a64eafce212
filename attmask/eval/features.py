"""Frozen-feature extraction from a teacher backbone over an evaluation stream."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterable, Optional

import torch

from attmask.models.vit import MaskedViT


@dataclass
class Features:
    features: torch.Tensor  # (N, D * n_last_blocks), float32 on CPU
    labels: torch.Tensor  # (N,)
    keys: list[str]


@torch.no_grad()
def extract_features(backbone: MaskedViT, batches: Iterable[dict], *, n_last_blocks: int = 1,
                     device: Optional[torch.device] = None,
                     autocast_dtype: Optional[torch.dtype] = None) -> Features:
    """[CLS] features of every image in ``batches`` (EvalStream layout)."""
    device = device or next(backbone.parameters()).device
    was_training = backbone.training
    backbone.eval()
    feats, labels, keys = [], [], []
    ctx = (torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype
           else contextlib.nullcontext())
    for batch in batches:
        images = batch["image"].to(device, non_blocking=True)
        with ctx:
            feats.append(backbone.cls_features(images, n_last_blocks).float().cpu())
        labels.append(batch["label"])
        keys += batch["key"]
    backbone.train(was_training)
    return Features(torch.cat(feats), torch.cat(labels), keys)

