"""Backbone + head, with the multi-crop forward of the iBOT student."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from attmask.models.head import IBOTHead
from attmask.models.vit import MaskedViT


class MultiCropNet(nn.Module):
    """One forward for all crops, so DDP sees a single call per step.

    The student's patch branch runs only on masked tokens (the only ones the loss reads) and
    local crops run the [CLS] branch only; the official code projects every token and discards
    most of them.
    """

    def __init__(self, backbone: MaskedViT, head: IBOTHead) -> None:
        super().__init__()
        self.backbone, self.head = backbone, head

    def forward(self, global_crops: torch.Tensor, local_crops: Optional[torch.Tensor] = None,
                masks: Optional[torch.Tensor] = None, patch_logits: bool = True):
        """Return [CLS] logits of every view (globals first) and logits of the masked patches."""
        out = self.backbone.forward_tokens(global_crops, mask=masks)
        cls = out.cls
        if local_crops is not None and len(local_crops):
            cls = torch.cat([cls, self.backbone.forward_tokens(local_crops).cls])
        masked = out.patches[masks] if (patch_logits and masks is not None) else None
        return self.head(cls, masked)
