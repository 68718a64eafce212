"""The evaluation suite on one checkpoint: k-NN, linear probe, few-shot, background robustness
and attention-on-object (protocols of the reference, section 5).

Everything here runs without Ray: :class:`Evaluator` loads the teacher backbone (strictly: a
checkpoint that does not fit the architecture is an error, never a half-random model), caches
features per (checkpoint, dataset, split, blocks) on disk, and computes each part; the pipeline
only decides where the parts run.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Optional

import numpy as np
import torch

from attmask.config import Config
from attmask.data.shards import Dataset, load_dataset
from attmask.data.sources import check_image_npz
from attmask.data.stream import EvalStream, make_loader, stratified_keys, stratified_subset
from attmask.data.transforms import EvalTransform
from attmask.errors import DataError, UserError
from attmask.eval.attention import attention_on_object
from attmask.eval.baselines import PixelFeatures, baseline_id, baseline_model
from attmask.eval.features import Features, extract_features
from attmask.eval.fewshot import fewshot_knn
from attmask.eval.finetune import finetune
from attmask.eval.knn import knn_accuracy
from attmask.eval.linear import (
    ProbeResult,
    accuracy,
    confusion_matrix,
    train_probe,
    train_probe_lbfgs,
    train_probe_official,
)
from attmask.models.export import load_teacher
from attmask.models.vit import MaskedViT
from attmask.runtime import resolve_device

SUITE = ["knn", "linear", "fewshot", "robustness", "attention", "finetune"]  # every part
DEFAULT_SUITE = SUITE[:5]  # fine-tuning trains the whole network: asked for by name
VARIANT_PREFIX = "test_"
LINEAR_PROTOCOLS = ("cached", "official")


@dataclass
class EvalOptions:
    suite: list[str] = field(default_factory=lambda: list(DEFAULT_SUITE))
    knn_ks: tuple[int, ...] = (10, 20, 100, 200)
    knn_blocks: int = 1
    linear_blocks: int = 4
    probe_epochs: int = 100
    probe_lr: float = 0.01
    # cached: SGD on cached centre-view features, epoch chosen on a share of train (fast, the
    # default); official: DINO's augmented-crop protocol with an LR sweep, LR and epoch chosen on
    # the val split (comparable with the paper's linear numbers; a forward pass per image and
    # epoch)
    linear_protocol: str = "cached"
    shots: tuple[int, ...] = (1, 5, 10, 20)
    max_train_samples: Optional[int] = None
    max_test_samples: Optional[int] = None
    # Attention on the object is a mean over many patches: a cap lets the k-NN read a large
    # test split (its interval narrows with the images) without attention maps of that size.
    max_attention_samples: Optional[int] = None  # default: max_test_samples
    batch_size: int = 256
    # Fine-tuning (short BEiT/iBOT schedule, attmask/eval/finetune.py)
    finetune_epochs: int = 3
    finetune_lr: float = 1e-3
    finetune_layer_decay: float = 0.75
    finetune_max_train: int = 5000  # images held in memory for the short schedule
    finetune_batch_size: int = 64

    def validate(self) -> "EvalOptions":
        """Checks every option (CLI flags and a benchmark's ``evaluation:`` alike) before any
        work: a probe of 0 epochs or a cap of -1 images would otherwise give meaningless scores."""
        suite = self.suite if isinstance(self.suite, (list, tuple)) else [self.suite]
        unknown = [s for s in suite if s not in SUITE]
        if unknown or not suite:
            raise UserError(f"--suite {','.join(map(str, suite))}: allowed parts are "
                            f"{','.join(SUITE)}")
        positive = {"probe_epochs": self.probe_epochs, "batch_size": self.batch_size,
                    "knn_blocks": self.knn_blocks, "linear_blocks": self.linear_blocks,
                    "finetune_epochs": self.finetune_epochs,
                    "finetune_max_train": self.finetune_max_train,
                    "finetune_batch_size": self.finetune_batch_size}
        positive.update({name: value for name, value in (
            ("max_train", self.max_train_samples), ("max_test", self.max_test_samples),
            ("max_attention", self.max_attention_samples)) if value is not None})
        for name, value in positive.items():
            if not _is_int(value) or value < 1:
                raise UserError(f"{name}={value!r}: must be an integer >= 1 "
                                f"(--{name.replace('_', '-')})")
        for name, values in (("knn_ks", self.knn_ks), ("shots", self.shots)):
            if not values or not all(_is_int(v) and v >= 1 for v in values):
                raise UserError(f"{name}={values!r}: must be integers >= 1")
        for name in ("probe_lr", "finetune_lr"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise UserError(f"{name}={value!r}: must be a number > 0")
        if self.linear_protocol not in LINEAR_PROTOCOLS:
            raise UserError(f"--linear-protocol {self.linear_protocol!r}: allowed values are "
                            f"{', '.join(LINEAR_PROTOCOLS)}")
        decay = self.finetune_layer_decay
        if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0 < decay <= 1:
            raise UserError(f"finetune_layer_decay={decay!r}: allowed range is (0, 1]")
        return self


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def npz_batches(path: Path, transform: EvalTransform, batch_size: int,
                limit: Optional[int] = None) -> Iterator[dict]:
    """Batches (EvalStream layout) from one ``.npz`` file of an external robustness set; with
    ``limit``, a class-stratified subset of that many images."""
    with np.load(path, allow_pickle=False) as z:
        images, labels = z["images"], z["labels"]
    subset = stratified_subset(labels.tolist(), limit)
    index = np.arange(len(images)) if subset is None else np.asarray(subset)
    for start in range(0, len(index), batch_size):
        rows = index[start:start + batch_size]
        chunk = torch.from_numpy(images[rows]).permute(0, 3, 1, 2)
        yield {"image": torch.stack([transform(img) for img in chunk]),
               "label": torch.from_numpy(labels[rows]).long(),
               "key": [f"{path.stem}{i:07d}" for i in rows]}


@dataclass(frozen=True)
class FeatureSource:
    """Where one feature set's images come from: a split of the shard dataset or one ``.npz``
    file. ``train`` sources are capped by ``max_train``, the others by ``max_test``."""

    name: str
    split: Optional[str] = None
    npz: Optional[Path] = None
    train: bool = False

    @classmethod
    def shards(cls, split: str) -> "FeatureSource":
        return cls(split, split=split, train=split == "train")


@dataclass(frozen=True)
class RobustnessSet:
    """Background robustness inputs (ImageNet-9 style): the images a probe is trained on and the
    variants it is tested on, by variant name (``mixed_rand``, ...)."""

    train: FeatureSource
    variants: dict[str, FeatureSource]

    @classmethod
    def from_folder(cls, root: Path, num_classes: int, dataset_root: str | Path
                    ) -> "RobustnessSet":
        """``train_original.npz`` and ``test_<variant>.npz`` files, each checked (cheap: no
        model is built)."""
        train = root / "train_original.npz"
        files = sorted(root.glob(f"{VARIANT_PREFIX}*.npz")) if root.is_dir() else []
        if not train.is_file() or not files:
            raise DataError(f"--robustness-set {root}: needs train_original.npz and at least "
                            f"one test_<variant>.npz (found "
                            f"{'train_original.npz' if train.is_file() else 'neither'}"
                            f"{'' if files or not train.is_file() else ' only'})")
        for path in [train, *files]:
            check_image_npz(path, num_classes, dataset_root)
        return cls(FeatureSource(train.stem, npz=train, train=True),
                   {p.stem.removeprefix(VARIANT_PREFIX): FeatureSource(p.stem, npz=p)
                    for p in files})

    @classmethod
    def from_dataset(cls, dataset: Dataset) -> Optional["RobustnessSet"]:
        """The dataset's own ``test_<variant>`` splits (the synthetic data has them)."""
        variants = {s.removeprefix(VARIANT_PREFIX): FeatureSource.shards(s)
                    for s in dataset.splits if s.startswith(VARIANT_PREFIX)}
        return cls(FeatureSource.shards("train"), variants) if variants else None


class Evaluator:
    """One model on one dataset; features are cached under ``cache_dir``.

    Build it with :meth:`from_checkpoint` (a trained teacher) or :meth:`for_baseline` (the
    untrained ``init`` network of a seed, or raw ``pixels``); every part then runs the same way.
    """

    def __init__(self, model: MaskedViT | PixelFeatures, cfg: Config, model_id: str,
                 data: str | Path, *,
                 cache_dir: str | Path, options: Optional[EvalOptions] = None,
                 robustness_set: Optional[str | Path] = None,
                 device: Optional[torch.device] = None) -> None:
        self.options = options or EvalOptions()
        self.options.validate()
        self.model, self.cfg, self.model_id = model, cfg, model_id
        self.device = device or resolve_device()
        self.model.to(self.device)
        self.dataset: Dataset = load_dataset(data)
        self._check_data()
        self.robustness_set = (
            RobustnessSet.from_folder(Path(robustness_set), len(self.dataset.classes),
                                      self.dataset.root)
            if robustness_set else RobustnessSet.from_dataset(self.dataset))
        self.transform = EvalTransform(self.cfg.model.image_size)
        self.cache_dir = Path(cache_dir)
        self.num_classes = len(self.dataset.classes)
        self._train_mean: dict[int, torch.Tensor] = {}  # for models that centre their features

    @classmethod
    def from_checkpoint(cls, checkpoint: str | Path, data: str | Path, *,
                        config: Optional[Config] = None, **kwargs) -> "Evaluator":
        backbone, cfg = load_teacher(checkpoint, config)
        return cls(backbone, cfg, _file_id(Path(checkpoint)), data, **kwargs)

    @classmethod
    def for_baseline(cls, kind: str, cfg: Config, data: str | Path, **kwargs) -> "Evaluator":
        return cls(baseline_model(kind, cfg), cfg, baseline_id(kind, cfg), data, **kwargs)

    @property
    def backbone(self) -> Optional[MaskedViT]:
        """The ViT being evaluated, or None for raw pixels (no attention to read)."""
        return self.model if isinstance(self.model, MaskedViT) else None

    def _check_data(self) -> None:
        m, ds = self.cfg.model, self.dataset
        if ds.image_size < m.image_size:
            raise DataError(f"{ds.root}: images are {ds.image_size} px, smaller than the "
                            f"model input {m.image_size} px")
        for split in ("train", "test"):
            if split not in ds.splits:
                raise DataError(f"{ds.root}: the evaluation needs a '{split}' split "
                                f"(has {', '.join(ds.splits)})")

    # -- features ---------------------------------------------------------------------------

    def features(self, source: FeatureSource | str, blocks: int) -> Features:
        """Concatenated [CLS] of the last ``blocks`` blocks. One extraction (and cache entry) with
        the most blocks any part needs serves all: fewer blocks are its last columns."""
        most = max(self.options.knn_blocks, self.options.linear_blocks)
        if blocks > most:
            raise ValueError(f"blocks={blocks} > {most}")
        most = min(most, self.model.max_blocks)  # a 2-block model has no 4 last blocks
        blocks = min(blocks, most)
        if isinstance(source, str):
            source = FeatureSource.shards(source)
        cached = self._extract(source, most)
        dim = cached.features.shape[1] // most
        features = cached.features[:, -blocks * dim:]
        if getattr(self.model, "center", False):
            if most not in self._train_mean:  # once, not a reload of the train cache per call
                self._train_mean[most] = self._extract(FeatureSource.shards("train"),
                                                       most).features.mean(0)
            features = features - self._train_mean[most][-blocks * dim:]
        return Features(features, cached.labels, cached.keys)

    def _extract(self, source: FeatureSource, blocks: int) -> Features:
        limit = self.options.max_train_samples if source.train else self.options.max_test_samples
        origin = [str(source.npz), _file_id(source.npz)] if source.npz else [self.dataset.root,
                                                                              source.split]
        key = json.dumps([self.model_id, *origin, blocks, limit, "stratified",
                          self.cfg.model.image_size, manifest_id(self.dataset)])
        path = self.cache_dir / f"{hashlib.sha256(key.encode()).hexdigest()[:24]}.pt"
        if path.is_file():
            cached = torch.load(path, weights_only=True)
            return Features(cached["features"], cached["labels"], cached["keys"])
        # A cap takes a class-stratified subset (fixed seed), never the first images read.
        batches: Iterable[dict]
        if source.npz is not None:
            batches = npz_batches(source.npz, self.transform, self.options.batch_size, limit)
        else:
            assert source.split is not None  # a source is a split or an .npz file
            stream = EvalStream(self.dataset, source.split, self.transform,
                                self.options.batch_size,
                                max_corrupt_fraction=self.cfg.data.max_corrupt_fraction,
                                keys=stratified_keys(self.dataset, source.split, limit))
            batches = make_loader(stream, 0)
        feats = extract_features(self.model, batches, n_last_blocks=blocks, device=self.device)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save({"features": feats.features, "labels": feats.labels, "keys": feats.keys}, tmp)
        tmp.replace(path)
        return feats

    def prefetch(self) -> None:
        """Extract (and cache) every feature set the selected parts need."""
        o, sources = self.options, set()
        if {"knn", "fewshot", "linear"} & set(o.suite):
            sources |= {FeatureSource.shards("train"), FeatureSource.shards("test")}
        if "robustness" in o.suite and self.robustness_set is not None:
            sources |= {self.robustness_set.train, *self.robustness_set.variants.values()}
        for source in sorted(sources, key=lambda x: x.name):
            self.features(source, 1)

    # -- parts --------------------------------------------------------------------------------

    def knn(self) -> dict:
        b = self.options.knn_blocks
        tr, te = self.features("train", b), self.features("test", b)
        return knn_accuracy(tr.features, tr.labels, te.features, te.labels, self.num_classes,
                            ks=self.options.knn_ks, test_keys=te.keys)

    def linear(self) -> tuple[dict, torch.Tensor]:
        b = self.options.linear_blocks
        tr, te = self.features("train", b), self.features("test", b)
        if self.options.linear_protocol == "official" and self.backbone is not None:
            probe = self._official_probe(self.backbone, b)
        else:
            probe = self._probe(tr)
        result = {"top1": accuracy(probe.model, te.features, te.labels),
                  "val_top1": probe.val_top1, "epoch": probe.epoch, "solver": probe.solver,
                  "n_last_blocks": min(b, self.model.max_blocks)}
        if probe.solver == "lbfgs":
            result.update(l2=probe.l2, converged=probe.converged)
        if probe.solver == "sgd-augmented":
            result.update(protocol="official", lr=probe.lr)
        return result, confusion_matrix(probe.model, te.features, te.labels, self.num_classes)

    def _probe(self, train: Features) -> ProbeResult:
        """The linear probe: DINO's SGD schedule on a network's features; on raw pixels, where
        that schedule ends unconverged (best epoch = last), a probe solved to convergence."""
        if self.backbone is None:
            return train_probe_lbfgs(train.features, train.labels, self.num_classes)
        return train_probe(train.features, train.labels, self.num_classes,
                           epochs=self.options.probe_epochs, lr=self.options.probe_lr)

    def _official_probe(self, backbone: MaskedViT, blocks: int) -> ProbeResult:
        if "val" not in self.dataset.splits:
            raise DataError(f"{self.dataset.root}: --linear-protocol official chooses its LR on "
                            "the val split, which this dataset lacks (prepare-data holds one "
                            "out unless --val-fraction 0)")
        val = self.features("val", blocks)
        keys = stratified_keys(self.dataset, "train", self.options.max_train_samples)

        def train_batches():
            stream = EvalStream(self.dataset, "train", self.transform, self.options.batch_size,
                                max_corrupt_fraction=self.cfg.data.max_corrupt_fraction,
                                keys=keys)
            return make_loader(stream, 0)

        return train_probe_official(backbone, train_batches, val.features, val.labels,
                                    self.num_classes,
                                    n_last_blocks=min(blocks, self.model.max_blocks),
                                    image_size=self.cfg.model.image_size,
                                    epochs=self.options.probe_epochs,
                                    batch_size=self.options.batch_size, device=self.device)

    def fewshot(self) -> dict:
        b = self.options.knn_blocks
        tr, te = self.features("train", b), self.features("test", b)
        return fewshot_knn(tr.features, tr.labels, te.features, te.labels, self.num_classes,
                           shots=self.options.shots)

    def robustness(self) -> dict:
        rob = self.robustness_set
        if rob is None:
            return {"skipped": f"{self.dataset.root} has no test_<variant> splits and no "
                               "--robustness-set was given"}
        b = self.options.linear_blocks
        tr = self.features(rob.train, b)
        probe = self._probe(tr)
        accs = {}
        for name, source in rob.variants.items():
            te = self.features(source, b)
            accs[name] = accuracy(probe.model, te.features, te.labels)
        out: dict = {"variants": accs}
        if "mixed_same" in accs and "mixed_rand" in accs:
            out["bg_gap"] = accs["mixed_same"] - accs["mixed_rand"]
        return out

    def attention(self) -> dict:
        if not self.dataset.has_fg():
            return {"skipped": f"{self.dataset.root} has no foreground masks"}
        if self.backbone is None:
            return {"skipped": "raw pixels have no attention"}
        m, o = self.cfg.masking, self.options
        cap = o.max_attention_samples or o.max_test_samples
        stream = EvalStream(self.dataset, "test", self.transform, o.batch_size,
                            keys=stratified_keys(self.dataset, "test", cap))
        mid = sum(m.ratio) / 2
        return attention_on_object(self.backbone, make_loader(stream, 0), self.cfg.model.patch_size,
                                   layer=m.layer, head_reduce=m.head_reduce, mask_ratio=mid,
                                   device=self.device)

    def finetune(self) -> dict:
        """The whole network trained end to end from these weights (short schedule) on a
        class-stratified subset of the train split, scored on the test split."""
        if self.backbone is None:
            return {"skipped": "raw pixels have no network to fine-tune"}
        o = self.options
        limit = min(o.finetune_max_train, o.max_train_samples or o.finetune_max_train)
        images, labels = [], []
        for batch in make_loader(EvalStream(self.dataset, "train", self.transform, o.batch_size,
                                            keys=stratified_keys(self.dataset, "train", limit)), 0):
            images.append(batch["image"])
            labels.append(batch["label"])
        test = make_loader(EvalStream(
            self.dataset, "test", self.transform, o.batch_size,
            keys=stratified_keys(self.dataset, "test", o.max_test_samples)), 0)
        return finetune(self.backbone, torch.cat(images), torch.cat(labels), test,
                        self.num_classes, epochs=o.finetune_epochs, lr=o.finetune_lr,
                        layer_decay=o.finetune_layer_decay, batch_size=o.finetune_batch_size,
                        seed=self.cfg.train.seed, device=self.device)

    def viz_batch(self, count: int = 8) -> dict:
        stream = EvalStream(self.dataset, "test", self.transform, count)
        return next(iter(make_loader(stream, 0)))


def _file_id(path: Path) -> str:
    if path.is_dir():
        path = path / "state.pt"
    stat = path.stat()
    return f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"


def manifest_id(dataset: Dataset) -> str:
    return hashlib.sha256(json.dumps(dataset.manifest, sort_keys=True).encode()).hexdigest()[:16]
