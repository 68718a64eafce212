"""``prepare-data``: turn a source (synthetic, CIFAR-10, .npz folder, image folder) into shards."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional

from attmask.data.holdout import DEFAULT_VAL_FRACTION, Holdout
from attmask.data.shards import existing_manifest, write_shards
from attmask.data.sources import (
    SourceSpec,
    cifar10_source,
    imagefolder_source,
    npz_source,
    synthetic_source,
)
from attmask.data.synthetic import COLOURS
from attmask.errors import DataError, check_output_dir

SOURCES = ["synthetic", "cifar10", "npz", "imagefolder"]
# Arguments added after data folders were first written: left out of the manifest at these
# values, so that folders prepared before they existed stay current.
LATER_ARGS = {"colours": "random", "num_variant_samples": None}


@dataclass
class PrepareArgs:
    source: str
    out: str
    from_path: Optional[str] = None
    num_samples: Optional[int] = None
    num_test_samples: Optional[int] = None
    per_class: Optional[int] = None
    shard_size: Optional[int] = None
    image_size: Optional[int] = None
    seed: int = 0
    num_classes: int = 10
    bg_correlation: float = 0.8
    colours: str = "random"
    num_variant_samples: Optional[int] = None  # synthetic: images per robustness variant
    # The val split, held out of train: a share of each class (default 10 %), or N per class;
    # --val-fraction 0 holds out none.
    val_fraction: Optional[float] = None
    val_per_class: Optional[int] = None

    def validate(self) -> None:
        if self.source not in SOURCES:
            raise DataError(f"--source {self.source!r}: allowed values are {', '.join(SOURCES)}")
        for name in ("num_samples", "num_test_samples", "per_class", "shard_size", "image_size",
                     "num_variant_samples"):
            value = getattr(self, name)
            if value is not None and value < (0 if name == "num_test_samples" else 1):
                raise DataError(f"--{name.replace('_', '-')}={value}: must be a positive integer")
        if self.colours not in COLOURS:
            raise DataError(f"--colours {self.colours!r}: allowed values are {', '.join(COLOURS)}")
        if self.colours != "random" and self.source != "synthetic":
            raise DataError(f"--colours {self.colours}: applies to --source synthetic only")
        if self.num_variant_samples is not None and self.source != "synthetic":
            raise DataError("--num-variant-samples: applies to --source synthetic only (the "
                            "built-in data draws the robustness variants)")
        if not isinstance(self.seed, int) or not 0 <= self.seed < 1 << 63:
            raise DataError(f"--seed={self.seed}: allowed range is [0, 2^63 - 1]")
        if self.val_fraction is not None and self.val_per_class is not None:
            raise DataError("--val-fraction and --val-per-class: give one of them")
        if self.val_fraction is not None and not (isinstance(self.val_fraction, (int, float))
                                                  and 0.0 <= self.val_fraction < 1.0):
            raise DataError(f"--val-fraction={self.val_fraction}: allowed range is [0, 1) (0 "
                            "holds out no val split)")
        if self.val_per_class is not None and self.val_per_class < 1:
            raise DataError(f"--val-per-class={self.val_per_class}: must be a positive integer")
        if self.source in ("npz", "imagefolder") and not self.from_path:
            raise DataError(f"--source {self.source} needs --from PATH")
        if self.from_path and not Path(self.from_path).exists():
            raise DataError(f"--from {self.from_path}: no such file or directory")
        check_output_dir(self.out, "--out")


def build_source(a: PrepareArgs) -> SourceSpec:
    caps: dict[str, Any] = dict(num_samples=a.num_samples, num_test_samples=a.num_test_samples,
                                per_class=a.per_class, seed=a.seed)
    if a.source == "synthetic":
        try:
            return synthetic_source(a.num_samples or 10_000, a.num_test_samples,
                                    image_size=a.image_size or 32, seed=a.seed,
                                    num_classes=a.num_classes, bg_correlation=a.bg_correlation,
                                    per_class=a.per_class, colours=a.colours,
                                    num_variant_samples=a.num_variant_samples)
        except ValueError as exc:
            raise DataError(f"synthetic source: {exc}") from exc
    if a.source == "cifar10":
        return cifar10_source(a.from_path, Path(a.out) / ".download", **caps)
    assert a.from_path is not None  # validate(): npz and imagefolder need --from
    if a.source == "npz":
        return npz_source(a.from_path, **caps)
    return imagefolder_source(a.from_path, image_size=a.image_size, **caps)


def prepare_data(a: PrepareArgs) -> tuple[dict, bool]:
    """Write shards and manifest; returns (manifest, written). A repeat run is a no-op."""
    a.validate()
    args = asdict(a)
    args.pop("out")
    for name, before in LATER_ARGS.items():
        if args[name] == before:
            del args[name]
    if args["from_path"]:
        args["from_path"] = str(Path(args["from_path"]).resolve())
    if (old := existing_manifest(a.out, a.source, args)) is not None:
        return old, False
    return write_shards(build_source(a), a.out, source=a.source, args=args,
                        shard_size=a.shard_size, holdout=holdout(a)), True


def holdout(a: PrepareArgs) -> Optional[Holdout]:
    """The val split's rule for these arguments (None: no val split)."""
    if a.val_per_class is not None:
        return Holdout(per_class=a.val_per_class, seed=a.seed)
    fraction = DEFAULT_VAL_FRACTION if a.val_fraction is None else a.val_fraction
    return Holdout(fraction=fraction, seed=a.seed) if fraction > 0 else None
