"""Online k-NN monitor: teacher [CLS] features on a small labelled split, every few epochs
(AttMask's ``--eval_every``, section 3.9 of the reference), so runs and Tune trials can be
compared while they train."""
from __future__ import annotations

from typing import Optional

import torch

from attmask.config import Config
from attmask.data.shards import Dataset
from attmask.data.stream import EvalStream, make_loader, stratified_keys
from attmask.data.transforms import EvalTransform
from attmask.eval.features import extract_features
from attmask.eval.knn import knn_accuracy
from attmask.models.vit import MaskedViT


class OnlineKnn:
    """k-NN (k=20, T=0.07) of ``knn_train_samples`` train images against ``knn_test_samples``
    images of ``knn_split``, each a class-stratified subset chosen once with a fixed seed: the
    same images at every epoch, for every strategy and run seed, whatever the order of the
    shards. Unavailable when the manifest lacks the split."""

    def __init__(self, dataset: Dataset, cfg: Config, batch_size: int = 128) -> None:
        t = cfg.train
        self.dataset, self.cfg, self.batch_size = dataset, cfg, batch_size
        self.available = t.knn_every_epochs > 0 and t.knn_split in dataset.splits
        self.transform = EvalTransform(cfg.model.image_size)
        self._keys: dict[str, Optional[frozenset[str]]] = {}  # split -> its subset, once

    def due(self, epoch: int) -> bool:
        """After epoch index ``epoch`` (0-based): every K epochs and at the last one."""
        every, last = self.cfg.train.knn_every_epochs, self.cfg.train.epochs - 1
        return self.available and ((epoch + 1) % every == 0 or epoch == last)

    def __call__(self, backbone: MaskedViT, device: Optional[torch.device] = None,
                 prefix: str = "") -> dict:
        """``{prefix}knn_top1`` and ``{prefix}knn_top5`` of ``backbone``'s [CLS] features."""
        t = self.cfg.train
        feats = {}
        for split, limit in (("train", t.knn_train_samples), (t.knn_split, t.knn_test_samples)):
            if split not in self._keys:
                self._keys[split] = stratified_keys(self.dataset, split, limit)
            stream = EvalStream(self.dataset, split, self.transform, self.batch_size,
                                max_corrupt_fraction=self.cfg.data.max_corrupt_fraction,
                                keys=self._keys[split])
            feats[split] = extract_features(backbone, make_loader(stream, 0), device=device)
        train, test = feats["train"], feats[t.knn_split]
        result = knn_accuracy(train.features, train.labels, test.features, test.labels,
                              len(self.dataset.classes), ks=(20,))["k20"]
        return {f"{prefix}knn_top1": result["top1"], f"{prefix}knn_top5": result["top5"]}
