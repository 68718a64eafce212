"""A timm ``VisionTransformer`` that accepts a patch mask and returns cheap [CLS] attention.

The blocks, patch embedding and position embeddings are timm's own (state-dict keys match
``timm.create_model``); this subclass only adds iBOT's learnable mask token (Zhou et al., ICLR
2022) and the [CLS]-to-patch attention map that AttMask ranks patches by.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, TypeVar, cast

import torch
from timm.layers import Attention
from timm.models.vision_transformer import Block, VisionTransformer
from torch import nn
from torch.utils.checkpoint import checkpoint

from attmask.config import ModelConfig


# The registry names whose model_args :func:`timm_architecture` overrides; the name only tells a
# reader which family the weights belong to.
TIMM_NAMES = {"vit_tiny": "vit_tiny_patch16_224", "vit_small": "vit_small_patch16_224",
              "vit_base": "vit_base_patch16_224"}
V = TypeVar("V", bound=VisionTransformer)
# A backbone without a classifier whose position embeddings follow the input size (local crops).
HEADLESS = {"num_classes": 0, "dynamic_img_size": True}


@dataclass
class ViTOutput:
    cls: torch.Tensor  # (B, D), after the final norm
    patches: torch.Tensor  # (B, H*W, D), after the final norm
    attention: Optional[torch.Tensor] = None  # (B, H*W) [CLS]->patch attention, heads reduced


class MaskedViT(VisionTransformer):
    """ViT with a mask token applied before the position embeddings (sequence length unchanged).

    Any input size divisible by the patch size works (``dynamic_img_size``): the position
    embeddings are interpolated for local crops.
    """

    def __init__(self, **kwargs) -> None:
        super().__init__(**{**HEADLESS, **kwargs})
        self.mask_token = nn.Parameter(torch.zeros(1, 1, 1, self.embed_dim))
        self.checkpoint_blocks = 0  # the first N blocks recompute their activations in backward

    def forward_tokens(self, images: torch.Tensor, mask: Optional[torch.Tensor] = None,
                       attn_layer: Optional[int] = None, head_reduce: str = "mean") -> ViTOutput:
        """Run the backbone.

        Args:
            images: (B, 3, h, w) with h, w multiples of the patch size.
            mask: optional bool (B, H*W); True patches are replaced by the mask token.
            attn_layer: block index (negative allowed) whose [CLS] attention to return.
            head_reduce: ``mean`` (AttMask default) or ``max`` over heads.
        """
        x = self.patch_embed(images)  # (B, H, W, D)
        if mask is not None:
            x = torch.where(mask.view(x.shape[:3] + (1,)), self.mask_token.to(x.dtype), x)
        x = self.norm_pre(self.patch_drop(self._pos_embed(x)))
        target = None if attn_layer is None else attn_layer % len(self.blocks)
        attention = None
        for i, block in enumerate(cast(list[Block], self.blocks)):
            if i == target:
                attention = cls_attention(cast(Attention, block.attn), block.norm1(x),
                                          self.num_prefix_tokens,
                                          head_reduce)
            if i < self.checkpoint_blocks and torch.is_grad_enabled():
                x = checkpoint(block, x, use_reentrant=False)  # keeps the drop-path draws
            else:
                x = block(x)
        x = self.norm(x)
        return ViTOutput(cls=x[:, 0], patches=x[:, self.num_prefix_tokens:], attention=attention)

    @property
    def max_blocks(self) -> int:
        """How many blocks' [CLS] tokens :meth:`cls_features` can concatenate."""
        return len(self.blocks)

    def cls_features(self, images: torch.Tensor, n_last_blocks: int = 1) -> torch.Tensor:
        """Concatenated [CLS] tokens of the last ``n_last_blocks`` blocks, each through the final
        norm (DINO's ``get_intermediate_layers`` protocol for k-NN and linear probes). Keeps the
        autograd graph, so fine-tuning trains through it; frozen-feature callers wrap it in
        ``torch.no_grad()`` (:func:`attmask.eval.features.extract_features`)."""
        x = self.norm_pre(self.patch_drop(self._pos_embed(self.patch_embed(images))))
        outputs = []
        for i, block in enumerate(self.blocks):
            x = block(x)
            if i >= len(self.blocks) - n_last_blocks:
                outputs.append(self.norm(x[:, 0]))
        return torch.cat(outputs, dim=-1)

    def backbone_state_dict(self) -> dict[str, torch.Tensor]:
        """The weights ``timm.create_model`` loads (everything but the mask token)."""
        return {k: v for k, v in self.state_dict().items() if k != "mask_token"}


def cls_attention(attn: Attention, x: torch.Tensor, num_prefix: int = 1,
                  head_reduce: str = "mean") -> torch.Tensor:
    """softmax(q_cls K^T / sqrt(d)) of one timm ``Attention`` module, CLS column dropped.

    The blocks keep fused attention, so no attention matrix exists; this recomputes only the
    [CLS] query row. Folding the key projection into the query (q_h W_k,h) scores every token
    with one (B, N, D) x (B, D, heads) product: O(tokens x dim), no second forward pass. Done in
    fp32 so the ranking does not depend on autocast.
    """
    B, N, D = x.shape
    heads, head_dim = attn.num_heads, attn.head_dim
    inner = heads * head_dim
    x = x.float()
    qkv = cast(nn.Linear, attn.qkv)
    weight = qkv.weight.float()
    bias = qkv.bias.float() if qkv.bias is not None else torch.zeros(3 * inner, device=x.device)
    q = x[:, 0] @ weight[:inner].T + bias[:inner]  # (B, inner)
    q = attn.q_norm(q.view(B, heads, head_dim)) * attn.scale
    if isinstance(attn.k_norm, nn.Identity):
        w_k = weight[inner:2 * inner].view(heads, head_dim, D)
        folded = torch.einsum("bhe,hed->bhd", q, w_k)  # (B, heads, D)
        logits = torch.einsum("bnd,bhd->bhn", x, folded)
        key_bias = bias[inner:2 * inner].view(heads, head_dim)
        logits = logits + torch.einsum("bhe,he->bh", q, key_bias)[..., None]
    else:  # qk-norm models need the normalised keys themselves
        k = (x @ weight[inner:2 * inner].T + bias[inner:2 * inner]).view(B, N, heads, head_dim)
        logits = torch.einsum("bhe,bnhe->bhn", q, attn.k_norm(k))
    probs = logits.softmax(dim=-1)[:, :, num_prefix:]  # softmax over all keys, as the original
    if head_reduce == "mean":
        return probs.mean(dim=1)
    if head_reduce == "max":
        return probs.amax(dim=1)
    raise ValueError(f"head_reduce={head_reduce!r}: allowed values are 'mean', 'max'")


def hmlp_stem(patch_size: int, embed_dim: int) -> nn.Sequential:
    """Hierarchical MLP patch stem (Touvron et al., "Three things everyone should know about
    vision transformers", ECCV 2022), in two stages: non-overlapping convolutions of
    ``patch_size / 2`` and then 2 pixels with a GELU between, i.e. a small MLP per patch instead
    of one linear map. Patches stay independent, so a masked patch still leaks nothing into the
    tokens of its neighbours (a convolutional stem would)."""
    first, hidden = patch_size // 2, embed_dim // 4
    return nn.Sequential(nn.Conv2d(3, hidden, first, stride=first), nn.GELU(),
                         nn.Conv2d(hidden, embed_dim, 2, stride=2))


def timm_architecture(cfg: ModelConfig) -> tuple[str, dict]:
    """(model name, keyword arguments) with which ``timm.create_model`` builds this backbone, the
    one place its architecture is spelled out. A ``stem: hmlp`` backbone also needs
    :func:`with_stem`."""
    dim, depth, heads = cfg.dims
    return TIMM_NAMES[cfg.arch], {"img_size": cfg.image_size, "patch_size": cfg.patch_size,
                                  "embed_dim": dim, "depth": depth, "num_heads": heads,
                                  "qkv_bias": True, **HEADLESS}


def with_stem(model: V, cfg: ModelConfig) -> V:
    """``model`` with the patch stem ``cfg.stem`` names (timm builds the linear one)."""
    if cfg.stem == "hmlp":
        model.patch_embed.proj = hmlp_stem(cfg.patch_size, model.embed_dim)
    return model


def build_backbone(cfg: ModelConfig, drop_path: Optional[float] = None) -> MaskedViT:
    _, kwargs = timm_architecture(cfg)
    model = MaskedViT(**kwargs, drop_path_rate=cfg.drop_path if drop_path is None else drop_path)
    return with_stem(model, cfg)
