"""The two reference points every accuracy is read against (``../shared/reference/measuring.md``):

- ``init``: the teacher at step 0 of the seed, i.e. the untrained network every masking strategy
  of that seed starts from (:func:`attmask.engine.initial_networks`). A strategy's gain is its
  score minus this one, under the same protocol and data.
- ``pixels``: the raw pixels at the model's input size, normalised like the model's input and
  centred on the training mean (cosine k-NN on uncentred pixels mostly measures brightness).
"""
from __future__ import annotations

import hashlib
import json

import torch
from torch import nn

from attmask.config import Config
from attmask.engine import initial_networks
from attmask.models.vit import MaskedViT

BASELINES = ("init", "pixels")


class PixelFeatures(nn.Module):
    """Stands in for a backbone in feature extraction: an image's feature is its flattened,
    normalised pixels. It has no blocks to concatenate and no attention."""

    max_blocks = 1
    center = True  # subtract the training mean before k-NN and the probe

    def cls_features(self, images: torch.Tensor, n_last_blocks: int = 1) -> torch.Tensor:
        return images.flatten(1)


def init_backbone(cfg: Config) -> MaskedViT:
    """The teacher backbone exactly as training starts for ``cfg.train.seed``."""
    return initial_networks(cfg)[1].backbone.eval()


def baseline_model(kind: str, cfg: Config) -> MaskedViT | PixelFeatures:
    if kind not in BASELINES:
        raise ValueError(f"unknown baseline {kind!r}; available: {', '.join(BASELINES)}")
    return PixelFeatures() if kind == "pixels" else init_backbone(cfg)


def baseline_id(kind: str, cfg: Config) -> str:
    """What the baseline's features depend on: the input size for pixels; the architecture and
    the seed for init (not the masking strategy: every strategy starts from the same weights)."""
    if kind == "pixels":
        return f"pixels:{cfg.model.image_size}"
    arch = json.dumps(cfg.to_dict()["model"], sort_keys=True)
    return f"init:{cfg.train.seed}:{hashlib.sha256(arch.encode()).hexdigest()[:12]}"
