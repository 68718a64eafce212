"""Frozen-feature extraction from a teacher backbone over an evaluation stream, and the
features of a whole split written to a file (``attmask embed``)."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Optional

import numpy as np
import torch

from attmask.data.shards import load_dataset
from attmask.data.stream import EvalStream, make_loader, stratified_keys
from attmask.data.transforms import EvalTransform
from attmask.errors import UserError, check_output_file
from attmask.models.export import load_teacher, resolve_reference
from attmask.models.vit import MaskedViT

if TYPE_CHECKING:
    from attmask.eval.baselines import PixelFeatures


@dataclass
class Features:
    features: torch.Tensor  # (N, D * n_last_blocks), float32 on CPU
    labels: torch.Tensor  # (N,)
    keys: list[str]


@torch.no_grad()
def extract_features(backbone: MaskedViT | PixelFeatures, batches: Iterable[dict], *,
                     n_last_blocks: int = 1,
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



def embed_dataset(checkpoint: str | Path, data: str | Path, out: str | Path, *,
                  split: str = "test", n_last_blocks: int = 1, limit: Optional[int] = None,
                  batch_size: int = 128, tracking_uri: Optional[str] = None,
                  device: Optional[torch.device] = None) -> Path:
    """Write the teacher's [CLS] features of one split of a shard dataset to ``out`` (``.npz``:
    ``features`` (N, D), ``labels`` (N,), ``keys`` (N,), ``checkpoint``, ``split``).

    ``checkpoint`` is any backbone reference :func:`attmask.load_backbone` takes; ``limit``
    keeps a class-stratified subset of that many images. Inputs are checked before any image is
    read, and the file appears only once complete.
    """
    out = check_output_file(out, "--out")
    if out.suffix != ".npz":
        raise UserError(f"--out {out}: expected a file name ending in .npz")
    dataset = load_dataset(data)
    if split not in dataset.splits:
        raise UserError(f"--split {split}: {dataset.root} has {', '.join(dataset.splits)}")
    backbone, cfg = load_teacher(resolve_reference(checkpoint, tracking_uri), None)
    if not 1 <= n_last_blocks <= backbone.max_blocks:
        raise UserError(f"--blocks {n_last_blocks}: allowed range is 1-{backbone.max_blocks}")
    if dataset.image_size < cfg.model.image_size:
        raise UserError(f"{dataset.root}: images are {dataset.image_size} px, smaller than the "
                        f"model input {cfg.model.image_size} px")
    stream = EvalStream(dataset, split, EvalTransform(cfg.model.image_size), batch_size,
                        keys=stratified_keys(dataset, split, limit))
    feats = extract_features(backbone.to(device or torch.device("cpu")), make_loader(stream, 0),
                             n_last_blocks=n_last_blocks)
    tmp = out.with_name(f".{out.name}.partial")
    with open(tmp, "wb") as f:  # np.savez would append .npz to a name without it
        np.savez(f, features=feats.features.numpy(), labels=feats.labels.numpy(),
                 keys=np.array(feats.keys), checkpoint=np.array(str(checkpoint)),
                 split=np.array(split))
    tmp.replace(out)
    return out
