"""Typed experiment configuration: YAML presets + ``key=value`` overrides, validated once.

Every section is a dataclass whose defaults follow the AttMask README recipe for ViT-S/16 on the
20 % ImageNet subset (Kakogeorgiou et al., ECCV 2022; see ``configs/paper-20pct-in1k.yaml``).
Presets in ``configs/`` override only what differs. Validation runs before any work starts and
raises :class:`ConfigError` naming the dotted field and what is allowed.
"""
from __future__ import annotations

import dataclasses
import re
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping, Optional

import yaml

from attmask.errors import ConfigError

REPO_ROOT = Path(__file__).resolve().parent.parent


def shipped(name: str) -> Path:
    """``configs/`` or ``tune_configs/``: the checkout's own, or, in an installed copy (``pip
    install .``, a cluster image), the one the wheel installed under ``<prefix>/share/attmask``."""
    checkout = REPO_ROOT / name
    return checkout if checkout.is_dir() else Path(sys.prefix) / "share" / "attmask" / name


PRESET_DIR = shipped("configs")
SEARCH_DIR = shipped("tune_configs")
# Names that become folder names and MLflow tag values: no separators, quotes or spaces.
SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
TRACKING_SCHEMES = ("http", "https", "sqlite", "postgresql", "mysql", "mssql", "databricks")

ARCHS = {  # name -> (embed_dim, depth, num_heads), the DeiT/DINO ViT sizes
    "vit_tiny": (192, 12, 3),
    "vit_small": (384, 12, 6),
    "vit_base": (768, 12, 12),
}


@dataclass
class ModelConfig:
    arch: str = "vit_small"
    depth: Optional[int] = None  # None: the arch's depth
    image_size: int = 224
    local_image_size: int = 96
    patch_size: int = 16
    # patch embedding: timm's linear map, or "hmlp", a per-patch MLP (attmask.models.vit)
    stem: Literal["linear", "hmlp"] = "linear"
    drop_path: float = 0.1
    out_dim: int = 8192
    shared_head: bool = True
    patch_out_dim: int = 8192  # only used when shared_head is false
    head_hidden_dim: int = 2048
    head_bottleneck_dim: int = 256
    head_layers: int = 3
    head_bn: bool = False  # batch norm in the head's MLP (DINO/iBOT --use_bn_in_head)
    norm_last_layer: bool = False

    def validate(self, p: str) -> None:
        _choice(f"{p}.arch", self.arch, list(ARCHS))
        if self.depth is not None:
            _range(f"{p}.depth", self.depth, 1, 48)
        _range(f"{p}.patch_size", self.patch_size, 1, 64)
        for name in ("image_size", "local_image_size"):
            size = getattr(self, name)
            if size <= 0 or size % self.patch_size:
                raise ConfigError(
                    f"{p}.{name}={size}: must be a positive multiple of "
                    f"{p}.patch_size={self.patch_size}")
        if self.stem == "hmlp" and self.patch_size % 2:
            raise ConfigError(f"{p}.stem=hmlp needs an even {p}.patch_size (its last stage "
                              f"merges 2 x 2), got {self.patch_size}")
        _range(f"{p}.drop_path", self.drop_path, 0.0, 1.0)
        for name in ("out_dim", "patch_out_dim", "head_hidden_dim", "head_bottleneck_dim"):
            _range(f"{p}.{name}", getattr(self, name), 1, 1 << 20)
        _range(f"{p}.head_layers", self.head_layers, 1, 8)

    @property
    def dims(self) -> tuple[int, int, int]:
        dim, depth, heads = ARCHS[self.arch]
        return dim, self.depth or depth, heads

    @property
    def grid(self) -> tuple[int, int]:
        return self.image_size // self.patch_size, self.image_size // self.patch_size


@dataclass
class MaskingConfig:
    strategy: str = "attmask_high"
    ratio: list[float] = field(default_factory=lambda: [0.1, 0.5])
    prob: float = 0.5
    # A strategy's own parameters, by strategy (each class names and checks its own), e.g.
    # {attmask_hint: {show_max: 0.1, num_hints: 2}, block: {aspect: 0.3}}; unset: class defaults.
    options: dict[str, dict[str, Any]] = field(default_factory=dict)
    layer: int = -1  # teacher block whose [CLS] attention ranks patches
    head_reduce: Literal["mean", "max"] = "mean"
    ratio_per: Literal["image", "batch"] = "image"

    def validate(self, p: str, depth: int) -> None:
        from attmask import masking

        _choice(f"{p}.strategy", self.strategy, masking.available())
        if len(self.ratio) != 2:
            raise ConfigError(f"{p}.ratio={self.ratio}: must be a pair [low, high]")
        if not 0.0 <= self.ratio[0] <= self.ratio[1] <= 1.0:
            raise ConfigError(f"{p}.ratio={self.ratio}: need 0 <= low <= high <= 1")
        _range(f"{p}.prob", self.prob, 0.0, 1.0)
        for name, options in self.options.items():
            if name not in masking.available():
                raise ConfigError(f"{p}.options.{name}: not a strategy; allowed: "
                                  f"{', '.join(masking.available())}")
            own = masking.parameters(name, own=True)
            types = typing.get_type_hints(masking.masker_class(name).__init__)
            for key, value in options.items():
                if key not in own:
                    raise ConfigError(f"{p}.options.{name}.{key}: {name} has no such parameter; "
                                      f"it has {', '.join(own) or 'none (set ratio and prob)'}")
                options[key] = _coerce(types[key], value, f"{p}.options.{name}.{key}")
            try:
                masking.make_masker(name, **self.masker_kwargs(name))
            except ValueError as exc:  # the class names the parameter: "aspect=0: ..."
                raise ConfigError(f"{p}.options.{name}.{exc}") from None
        if not -depth <= self.layer < depth:
            raise ConfigError(f"{p}.layer={self.layer}: allowed range is [{-depth}, {depth - 1}] "
                              f"for a {depth}-block model")

    def masker_kwargs(self, strategy: Optional[str] = None) -> dict[str, Any]:
        """Arguments of ``make_masker`` for ``strategy`` (default: this config's strategy)."""
        return dict(ratio=tuple(self.ratio), prob=self.prob, ratio_per=self.ratio_per,
                    **self.options.get(strategy or self.strategy, {}))


@dataclass
class LossConfig:
    framework: Literal["ibot", "dino"] = "ibot"
    student_temp: float = 0.1
    warmup_teacher_temp: float = 0.04
    teacher_temp: float = 0.07
    warmup_teacher_patch_temp: float = 0.04
    teacher_patch_temp: float = 0.07
    warmup_teacher_temp_epochs: int = 30
    lambda1: float = 1.0
    lambda2: float = 1.0
    center_momentum: float = 0.9
    # How the teacher's targets are kept from collapsing: "center" (an EMA centre, DINO/iBOT)
    # or "sinkhorn" (Sinkhorn-Knopp over the batch, SwAV/DINOv2; center_momentum is unused).
    centering: Literal["center", "sinkhorn"] = "center"
    # Share of patches (per image) that feed the patch centre. 1.0 = all patches, exactly as iBOT;
    # smaller values run the teacher head on fewer tokens (an unbiased, noisier centre estimate).
    patch_center_sample: float = 1.0

    def validate(self, p: str) -> None:
        for name in ("student_temp", "warmup_teacher_temp", "teacher_temp",
                     "warmup_teacher_patch_temp", "teacher_patch_temp"):
            _range(f"{p}.{name}", getattr(self, name), 1e-4, 10.0)
        _range(f"{p}.warmup_teacher_temp_epochs", self.warmup_teacher_temp_epochs, 0, 10_000)
        _range(f"{p}.lambda1", self.lambda1, 0.0, 100.0)
        _range(f"{p}.lambda2", self.lambda2, 0.0, 100.0)
        _range(f"{p}.center_momentum", self.center_momentum, 0.0, 1.0)
        if not 0.0 < self.patch_center_sample <= 1.0:
            raise ConfigError(f"{p}.patch_center_sample={self.patch_center_sample}: "
                              "allowed range is (0, 1]")


@dataclass
class OptimConfig:
    lr: float = 5e-4  # at a total batch of `lr_batch_reference`, scaled linearly
    lr_batch_reference: int = 256
    min_lr: float = 1e-6
    warmup_epochs: float = 10
    weight_decay: float = 0.04
    weight_decay_end: float = 0.4
    clip_grad: float = 3.0  # per tensor, 0 disables
    freeze_last_layer: int = 1  # epochs
    momentum_teacher: float = 0.99

    def validate(self, p: str) -> None:
        _range(f"{p}.lr", self.lr, 0.0, 10.0)
        _range(f"{p}.lr_batch_reference", self.lr_batch_reference, 1, 1 << 20)
        _range(f"{p}.min_lr", self.min_lr, 0.0, 10.0)
        _range(f"{p}.warmup_epochs", self.warmup_epochs, 0, 10_000)
        _range(f"{p}.weight_decay", self.weight_decay, 0.0, 10.0)
        _range(f"{p}.weight_decay_end", self.weight_decay_end, 0.0, 10.0)
        _range(f"{p}.clip_grad", self.clip_grad, 0.0, 1e6)
        _range(f"{p}.freeze_last_layer", self.freeze_last_layer, 0, 10_000)
        _range(f"{p}.momentum_teacher", self.momentum_teacher, 0.0, 1.0)


@dataclass
class TrainConfig:
    epochs: int = 100
    batch_size_per_worker: int = 60
    steps_per_epoch: Optional[int] = None  # None: train-split size // global batch
    precision: Literal["fp32", "bf16", "fp16", "auto"] = "auto"
    # torch.compile (inductor) of every block's attention and MLP, student and teacher: one
    # compiled graph serves all blocks of a shape (regional compilation). Off by default: on a
    # CPU it measured no faster than eager (docs/speed.md).
    compile: bool = False
    # Activation checkpointing: the first N of the student's blocks recompute their activations
    # in backward instead of keeping them (0: none). Each saves about 100 MB at vit-tiny-224 and
    # costs about 2 % of the step (docs/speed.md).
    checkpoint_blocks: int = 0
    seed: int = 0
    log_every_steps: int = 10
    checkpoint_every_steps: int = 0  # 0: only at the end of each epoch
    checkpoint_keep: int = 2
    run_name: Optional[str] = None
    output_dir: str = "runs"
    # Online monitor (AttMask section 3.9): teacher k-NN on a small labelled split. It reads the
    # val split (held out of train by prepare-data), since searches and early stopping decide
    # on it; knn_split=test must be asked for, and such runs are marked "selected on test".
    knn_every_epochs: int = 1  # 0 disables
    knn_split: str = "val"
    knn_train_samples: int = 1000
    knn_test_samples: int = 500
    knn_student: bool = False  # also score the student (student_knn_top1), beside the teacher

    def validate(self, p: str, depth: int) -> None:
        _range(f"{p}.epochs", self.epochs, 1, 100_000)
        _range(f"{p}.checkpoint_blocks", self.checkpoint_blocks, 0, depth)
        _range(f"{p}.batch_size_per_worker", self.batch_size_per_worker, 1, 1 << 16)
        if self.steps_per_epoch is not None:
            _range(f"{p}.steps_per_epoch", self.steps_per_epoch, 1, 1 << 30)
        _range(f"{p}.log_every_steps", self.log_every_steps, 1, 1 << 30)
        _range(f"{p}.checkpoint_every_steps", self.checkpoint_every_steps, 0, 1 << 30)
        _range(f"{p}.checkpoint_keep", self.checkpoint_keep, 1, 1000)
        _range(f"{p}.knn_every_epochs", self.knn_every_epochs, 0, 100_000)
        _range(f"{p}.knn_train_samples", self.knn_train_samples, 1, 1 << 24)
        _range(f"{p}.knn_test_samples", self.knn_test_samples, 1, 1 << 24)
        _range(f"{p}.seed", self.seed, 0, (1 << 63) - 1)  # torch's generators take 64 bits
        if self.knn_split == "train":
            raise ConfigError(f"{p}.knn_split=train: the monitor's bank is the train split; "
                              "score it on val (default) or a test split")
        if self.run_name is not None and not SAFE_NAME.fullmatch(self.run_name):
            raise ConfigError(f"{p}.run_name={self.run_name[:80]!r}: use 1-128 letters, digits and "
                              "'._-', starting with a letter or digit (it names a folder and an "
                              "MLflow run)")


# Keys added after benchmark results were committed, each with the value the runs made before it
# had: a benchmark's run names leave such a key out at that value, so a committed comparison
# keeps its finished runs (pipelines/benchmark.py); any other value names new runs.
LATER_KEYS = {"data.colour_on": "image"}


@dataclass
class DataConfig:
    path: Optional[str] = None  # a shard directory with dataset.json (prepare-data output)
    split: str = "train"
    global_crops_scale: list[float] = field(default_factory=lambda: [0.25, 1.0])
    local_crops_scale: list[float] = field(default_factory=lambda: [0.05, 0.25])
    local_crops_number: int = 6
    # Gaussian blur sigma: "official" U(0.1, 2) px for every crop (DINO/iBOT/AttMask code), or
    # "scaled": that range at 224 px, scaled with the crop size (small CPU crops stay legible).
    blur_sigma: Literal["scaled", "official"] = "scaled"
    # Colour distortion of every crop (DINO's): jitter strengths (brightness, contrast,
    # saturation, hue) applied with color_jitter_prob, then grayscale with grayscale_prob.
    color_jitter: list[float] = field(default_factory=lambda: [0.4, 0.4, 0.2, 0.1])
    color_jitter_prob: float = 0.8
    grayscale_prob: float = 0.2
    # Where that colour half of the augmentation runs: "image", torchvision per crop in the
    # loader workers; "batch", the loader only crops and flips, and the training process
    # applies the same distributions to the whole batch on its device (attmask/data/colour.py):
    # a fraction of the CPU time at small crop sizes, where the per-crop calls dominate.
    colour_on: Literal["image", "batch"] = "image"
    num_workers: int = 2
    shuffle_buffer: int = 1000
    verify_checksums: bool = True
    max_corrupt_fraction: float = 0.01

    def validate(self, p: str) -> None:
        for name in ("global_crops_scale", "local_crops_scale"):
            lo_hi = getattr(self, name)
            if len(lo_hi) != 2 or not 0.0 < lo_hi[0] <= lo_hi[1] <= 1.0:
                raise ConfigError(f"{p}.{name}={lo_hi}: need [low, high] with 0 < low <= high <= 1")
        _range(f"{p}.local_crops_number", self.local_crops_number, 0, 64)
        jitter = self.color_jitter
        if (len(jitter) != 4 or not all(0.0 <= x <= 1.0 for x in jitter[:3])
                or not 0.0 <= jitter[3] <= 0.5):
            raise ConfigError(f"{p}.color_jitter={jitter}: need [brightness, contrast, "
                              "saturation, hue], each in [0, 1] and hue in [0, 0.5]")
        _range(f"{p}.color_jitter_prob", self.color_jitter_prob, 0.0, 1.0)
        _range(f"{p}.grayscale_prob", self.grayscale_prob, 0.0, 1.0)
        _range(f"{p}.num_workers", self.num_workers, 0, 256)
        _range(f"{p}.shuffle_buffer", self.shuffle_buffer, 0, 1 << 24)
        _range(f"{p}.max_corrupt_fraction", self.max_corrupt_fraction, 0.0, 1.0)


@dataclass
class TrackingConfig:
    uri: Optional[str] = None  # None: sqlite database under the storage path
    experiment: str = "attmask"
    log_images_every_epochs: int = 5  # attention/mask grid PNG; 0 disables
    timeout_s: float = 5.0  # per request to a tracking server; logging never blocks training

    def validate(self, p: str) -> None:
        scheme = (self.uri or "").partition("://")[0]
        if self.uri is not None and scheme not in TRACKING_SCHEMES:
            raise ConfigError(f"{p}.uri={self.uri}: allowed: an MLflow server (http://HOST:PORT, "
                              "https://...) or a database (sqlite:///PATH, postgresql://, "
                              "mysql://); not a file store")
        if not SAFE_NAME.fullmatch(self.experiment):  # it names the registered model too
            raise ConfigError(f"{p}.experiment={self.experiment[:80]!r}: use 1-128 letters, "
                              "digits and . _ - (starting with a letter or digit)")
        _range(f"{p}.log_images_every_epochs", self.log_images_every_epochs, 0, 100_000)
        _range(f"{p}.timeout_s", self.timeout_s, 0.1, 600)


@dataclass
class RayConfig:
    num_workers: int = 1
    use_gpu: Optional[bool] = None  # None: use GPUs when the cluster has them
    cpus_per_worker: float = 1.0  # fractions allowed, as Ray's (e.g. 0.99 beside a Tune driver)
    storage_path: Optional[str] = None  # None: <train.output_dir>/ray
    max_failures: int = 0

    def validate(self, p: str) -> None:
        _range(f"{p}.num_workers", self.num_workers, 1, 4096)
        if not 0 < self.cpus_per_worker <= 1024:
            raise ConfigError(f"{p}.cpus_per_worker={self.cpus_per_worker}: allowed range is "
                              "(0, 1024]")
        _range(f"{p}.max_failures", self.max_failures, -1, 1000)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    masking: MaskingConfig = field(default_factory=MaskingConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    ray: RayConfig = field(default_factory=RayConfig)

    def validate(self) -> "Config":
        self.model.validate("model")
        self.masking.validate("masking", self.model.dims[1])
        self.loss.validate("loss")
        self.optim.validate("optim")
        self.train.validate("train", self.model.dims[1])
        self.data.validate("data")
        self.tracking.validate("tracking")
        self.ray.validate("ray")
        self._check_hints()
        return self

    def _check_hints(self) -> None:
        """AttMask-Hint on a grid too small to reveal any patch is AttMask-High under another
        name: refuse it, naming the grid and the smallest square grid where it reveals one."""
        from attmask import masking

        if self.masking.strategy != "attmask_hint":
            return
        hint = masking.make_masker("attmask_hint", **self.masking.masker_kwargs())
        assert isinstance(hint, masking.AttMaskHint)
        side = self.model.image_size // self.model.patch_size
        if hint.most_hints(side * side) > 0:
            return
        smallest = next((s for s in range(side + 1, 1025) if hint.most_hints(s * s) > 0), None)
        where = (f"the smallest grid where it reveals one is {smallest} x {smallest}"
                 if smallest else "no grid reveals one at these settings")
        raise ConfigError(
            f"masking.strategy=attmask_hint: on the {side} x {side} patch grid (model.image_size "
            f"{self.model.image_size} / model.patch_size {self.model.patch_size}) it reveals no "
            f"patch in any draw (show_max {hint.show_max}, ratio {self.masking.ratio}), so it "
            f"would equal attmask_high; {where}, or raise "
            "masking.options.attmask_hint.show_max or num_hints")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def flat(self) -> dict[str, Any]:
        """Dotted key -> value, e.g. for MLflow params (mappings flattened too)."""
        def walk(prefix: str, value: Any) -> dict[str, Any]:
            if isinstance(value, dict) and (value or "." not in prefix):
                return {k: v for key, item in value.items() for k, v in walk(
                    f"{prefix}.{key}" if prefix else key, item).items()}
            return {prefix: value}
        return walk("", self.to_dict())


# ----------------------------------------------------------------------------------------------
# Loading


def load_config(preset: str | None = None, path: str | Path | None = None,
                overrides: list[str] | Mapping[str, Any] | None = None) -> Config:
    """Build a validated :class:`Config` from a preset name or a YAML file plus overrides:
    ``key=value`` strings (the command line) or a mapping of dotted keys (search and benchmark
    files)."""
    data: dict[str, Any] = {}
    if preset is not None and path is not None:
        raise ConfigError("give either --preset or --config, not both")
    if preset is not None:
        path = preset_path(preset)
    if path is not None:
        data = read_yaml(path)
    items = (overrides.items() if isinstance(overrides, Mapping)
             else map(parse_override, overrides or []))
    for key, value in items:
        set_dotted(data, key, value)
    return from_dict(data).validate()


def config_source(name: str) -> Path:
    """The one resolver of "a preset name or a YAML file" (search and benchmark files name
    their base this way): ``NAME`` is ``configs/NAME.yaml``; a ``.yaml`` path is taken as given
    or, failing that, relative to where the presets live (``configs/x.yaml``)."""
    if not name.endswith((".yaml", ".yml")):
        return preset_path(name)
    for candidate in (Path(name), PRESET_DIR.parent / name):
        if candidate.is_file():
            return candidate
    raise ConfigError(f"config file {name} not found")


def preset_path(name: str) -> Path:
    path = PRESET_DIR / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))
        raise ConfigError(f"preset {name!r} not found ({path}); available: {', '.join(known)}")
    return path


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config file {path} is not UTF-8 text ({exc.reason} at byte "
                          f"{exc.start})") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}".replace("\n", " ")) from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: top level must be a mapping of sections")
    return data


def parse_override(item: str) -> tuple[str, Any]:
    if "=" not in item:
        raise ConfigError(f"override {item!r}: expected key=value, e.g. train.epochs=3")
    key, raw = item.split("=", 1)
    if not key.strip():
        raise ConfigError(f"override {item!r}: expected key=value, e.g. train.epochs=3")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {item!r}: value is not valid YAML") from exc
    return key.strip(), value


def set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    """``section.field`` (or deeper, into a mapping field: ``masking.options.block.aspect``)."""
    parts = key.split(".")
    if len(parts) < 2 or not all(parts):
        raise ConfigError(f"override key {key!r}: expected section.field, e.g. masking.ratio")
    node = data
    for i, part in enumerate(parts[:-1]):
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override key {key!r}: {'.'.join(parts[:i + 1])} is not a "
                              "mapping")
    node[parts[-1]] = value


def from_dict(data: dict[str, Any]) -> Config:
    return _build(Config, data, "")


def _build(cls: type, data: Any, path: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{path or 'config'}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        where = f"{path}.{unknown[0]}" if path else unknown[0]
        raise ConfigError(f"unknown config key {where!r}; allowed: {', '.join(sorted(names))}")
    kwargs = {name: _coerce(hints[name], value, f"{path}.{name}" if path else name)
              for name, value in data.items()}
    return cls(**kwargs)


def _coerce(tp: Any, value: Any, path: str) -> Any:
    origin = typing.get_origin(tp)
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return _build(tp, value, path)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(inner[0], value, path)
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise ConfigError(f"{path}={value!r}: allowed values are {', '.join(map(str, allowed))}")
        return value
    if tp is Any:
        return value
    if origin is dict:
        key_tp, value_tp = typing.get_args(tp)
        if not isinstance(value, dict) or not all(isinstance(k, key_tp) for k in value):
            raise ConfigError(f"{path}={value!r}: expected a mapping with {key_tp.__name__} keys")
        return {k: _coerce(value_tp, v, f"{path}.{k}") for k, v in value.items()}
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}={value!r}: expected a list, e.g. [0.1, 0.5]")
        return [_coerce(item_tp, v, f"{path}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}={value!r}: expected true or false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}={value!r}: expected an integer")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 6e-3 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path}={value!r}: expected a number")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}={value!r}: expected a string")
        return value
    raise TypeError(f"unsupported config type {tp} at {path}")  # a bug in this module, not input


def _range(path: str, value: float, lo: float, hi: float) -> None:
    if not lo <= value <= hi:
        raise ConfigError(f"{path}={value}: allowed range is [{lo}, {hi}]")


def _choice(path: str, value: str, allowed: list[str]) -> None:
    if value not in allowed:
        raise ConfigError(f"{path}={value!r}: allowed values are {', '.join(allowed)}")
