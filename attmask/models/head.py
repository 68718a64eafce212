"""iBOT projection head (Zhou et al., "iBOT: Image BERT Pre-Training with Online Tokenizer")."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# The number of masked patches changes from step to step, and oneDNN (torch's CPU matmul
# library) builds and caches kernels per matrix shape: with bf16 on AMX each new count cost about
# 20 MB of them, gigabytes over a run. Padding the patch rows to a multiple of this leaves the
# head a few dozen shapes (docs/speed.md, section 5).
ROW_BUCKET = 128


class WeightNormLinear(nn.Module):
    """Bias-free linear layer with weight normalisation, ``w = g * v / ||v||`` row-wise.

    As in DINO/iBOT the gain starts at 1 and is frozen when ``norm_last_layer`` is set.
    """

    def __init__(self, in_dim: int, out_dim: int, norm_last_layer: bool = True) -> None:
        super().__init__()
        self.weight_v = nn.Parameter(torch.empty(out_dim, in_dim))
        nn.init.trunc_normal_(self.weight_v, std=0.02)
        self.weight_g = nn.Parameter(torch.ones(out_dim, 1), requires_grad=not norm_last_layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Always in fp32, also under bf16/fp16 autocast: the logits are divided by a teacher
        # temperature of 0.04 before the softmax, which would turn bf16's step of about 0.004
        # near 1 into 0.1 and blur the targets.
        with torch.autocast(x.device.type, enabled=False):
            v = self.weight_v.float()
            return F.linear(x.float(), self.weight_g.float() * v / v.norm(dim=1, keepdim=True))


class IBOTHead(nn.Module):
    """MLP (GELU, optionally batch-normalised) -> L2-normalised bottleneck -> weight-normalised
    last layer.

    With ``shared_head`` (the AttMask/iBOT README setting) [CLS] and patch tokens use the same
    last layer; otherwise patches get their own ``patch_out_dim`` layer. Student and teacher are
    built from the same config, so their patch dimensions always agree (the official code's
    65536-vs-8192 crash cannot happen).
    """

    def __init__(self, in_dim: int, out_dim: int = 8192, *, hidden_dim: int = 2048,
                 bottleneck_dim: int = 256, num_layers: int = 3, norm_last_layer: bool = True,
                 shared_head: bool = True, patch_out_dim: int = 8192,
                 batch_norm: bool = False) -> None:
        super().__init__()
        dims = [in_dim] + [hidden_dim] * (num_layers - 1) + [bottleneck_dim]
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
            layers.append(nn.Linear(a, b))
            if i < num_layers - 1:
                # DINO/iBOT's --use_bn_in_head: batch statistics keep the hidden features from
                # all becoming the same vector, the collapse small batches fall into first.
                if batch_norm:
                    layers.append(nn.BatchNorm1d(b))
                layers.append(nn.GELU())
        self.mlp = nn.Sequential(*layers)
        self.mlp.apply(_init_linear)
        self.pad_rows = not batch_norm  # batch statistics must not see padding rows
        self.last_layer = WeightNormLinear(bottleneck_dim, out_dim, norm_last_layer)
        self.patch_last_layer = (None if shared_head else
                                 WeightNormLinear(bottleneck_dim, patch_out_dim, norm_last_layer))

    def project(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.mlp(x), dim=-1)

    def forward(self, cls_tokens: torch.Tensor, patch_tokens: torch.Tensor | None = None):
        """Logits for [CLS] tokens (N, D) and, optionally, patch tokens (M, D), in one MLP pass."""
        if patch_tokens is None:
            return self.last_layer(self.project(cls_tokens)), None
        n_cls, n_patch = len(cls_tokens), len(patch_tokens)
        rows = [cls_tokens, patch_tokens]
        if self.pad_rows and n_patch % ROW_BUCKET:
            rows.append(patch_tokens.new_zeros(ROW_BUCKET - n_patch % ROW_BUCKET,
                                               patch_tokens.shape[1]))
        z = self.project(torch.cat(rows))  # every row on its own: padding changes no real row
        if self.patch_last_layer is None:
            logits = self.last_layer(z)
            return logits[:n_cls], logits[n_cls:n_cls + n_patch]
        return self.last_layer(z[:n_cls]), self.patch_last_layer(z[n_cls:])[:n_patch]


def _init_linear(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        nn.init.zeros_(m.bias)
