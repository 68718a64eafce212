"""Does the teacher look at the object, and does AttMask-High hide it?

On images with foreground masks: the share of the teacher's top-k attended patches that lie on
the object, the share of AttMask-High's masked patches that do, and the share of all patches on
the object (the chance level for both)."""
from __future__ import annotations

import math
from typing import Iterable

import torch
import torch.nn.functional as F

from attmask.masking import make_masker
from attmask.models.vit import MaskedViT


def patch_foreground(fg: torch.Tensor, patch_size: int, threshold: float = 0.5) -> torch.Tensor:
    """(B, S, S) pixel masks -> (B, H*W) bool: a patch is on the object when at least
    ``threshold`` of its pixels are."""
    share = F.avg_pool2d(fg[:, None].float(), patch_size)[:, 0]
    return (share >= threshold).flatten(1)


@torch.no_grad()
def attention_on_object(backbone: MaskedViT, batches: Iterable[dict], patch_size: int, *,
                        layer: int = -1, head_reduce: str = "mean", top_fraction: float = 0.1,
                        mask_ratio: float = 0.3, device=None) -> dict[str, float]:
    device = device or next(backbone.parameters()).device
    masker = make_masker("attmask_high", ratio=(mask_ratio, mask_ratio), prob=1.0)
    on_top = on_masked = on_any = top_total = masked_total = total = 0.0
    for batch in batches:
        if "fg" not in batch:
            continue
        images = batch["image"].to(device)
        grid = (images.shape[2] // patch_size, images.shape[3] // patch_size)
        attn = backbone.forward_tokens(images, attn_layer=layer, head_reduce=head_reduce).attention
        assert attn is not None  # asked for with attn_layer
        fg = patch_foreground(batch["fg"], patch_size).to(device)
        k = max(1, math.floor(fg.shape[1] * top_fraction))
        top = torch.zeros_like(fg).scatter_(1, attn.topk(k, dim=1).indices, True)
        masked = masker(attn, grid)
        on_top += (top & fg).sum().item()
        top_total += top.sum().item()
        on_masked += (masked & fg).sum().item()
        masked_total += masked.sum().item()
        on_any += fg.sum().item()
        total += fg.numel()
    if total == 0:
        raise ValueError("no foreground masks in the data")
    return {"topk_on_object": on_top / top_total, "masked_on_object": on_masked / masked_total,
            "object_share": on_any / total, "top_fraction": top_fraction,
            "mask_ratio": mask_ratio}
