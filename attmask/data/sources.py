"""Dataset sources that ``prepare-data`` turns into shards.

A source names its classes and yields samples per split, one at a time (no split is held in
memory whole, except one ``.npz`` chunk at a time). Images are either uint8 HWC arrays (encoded
to PNG by the writer) or already-encoded JPEG/PNG bytes that are passed through untouched.
"""
from __future__ import annotations

import io
import random
import re
import zlib
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional

import numpy as np

from attmask.data.synthetic import VARIANTS, ObjectsOnBackgrounds
from attmask.errors import DataError

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                   "ship", "truck"]
IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff"}


@dataclass
class Sample:
    key: str
    label: int
    image: Optional[np.ndarray] = None  # (H, W, 3) uint8, or
    encoded: Optional[bytes] = None  # JPEG/PNG bytes with ``ext``
    ext: str = "png"
    fg: Optional[np.ndarray] = None  # (H, W) bool foreground mask
    meta: dict = field(default_factory=dict)


@dataclass
class SourceSpec:
    """What a source must produce: class names, image size and, per split, its samples."""

    classes: list[str]
    image_size: int
    splits: dict[str, tuple[int, Iterator[Sample]]]  # split -> (count, samples)
    skipped: list[str] = field(default_factory=list)  # unreadable inputs, filled while writing


def synthetic_source(num_samples: int = 10_000, num_test_samples: Optional[int] = None,
                     image_size: int = 32, seed: int = 0, num_classes: int = 10,
                     bg_correlation: float = 0.8, per_class: Optional[int] = None,
                     colours: str = "random", num_variant_samples: Optional[int] = None
                     ) -> SourceSpec:
    """``num_variant_samples``: images per robustness variant (the first test scenes), by
    default as many as the test split."""
    gen = ObjectsOnBackgrounds(image_size, num_classes, bg_correlation, seed, colours)
    n_test = num_samples // 5 if num_test_samples is None else num_test_samples
    n_variant = n_test if num_variant_samples is None else min(num_variant_samples, n_test)

    def plain(split: str, count: int) -> Iterator[Sample]:
        for i in range(count):
            s = gen.sample(split, i)
            yield Sample(f"{split}{i:07d}", s.label, image=s.image, fg=s.fg, meta=s.meta)

    def variant(name: str) -> Iterator[Sample]:
        for i in range(n_variant):
            s = gen.variants(i)[name]
            yield Sample(f"{name}{i:07d}", s.label, image=s.image, fg=s.fg, meta=s.meta)

    splits = {"train": (num_samples, plain("train", num_samples)),
              "test": (n_test, plain("test", n_test))}
    splits.update({f"test_{v}": (n_variant, variant(v)) for v in VARIANTS})
    if per_class is not None:
        splits = {k: _per_class_stream(it, per_class, num_classes) for k, (_, it) in splits.items()}
    return SourceSpec(gen.classes, image_size, splits)


def check_image_npz(path: Path, num_classes: Optional[int] = None,
                    dataset_root: str | Path = "") -> tuple[tuple[int, ...], np.ndarray]:
    """``images`` (uint8 RGB, (N, H, W, 3)) and ``labels`` (N integers >= 0, below
    ``num_classes`` when given) of one ``.npz``, checked; returns the image shape and labels.
    Anything else is named here (no pickled objects are ever loaded)."""
    try:
        with np.load(path, allow_pickle=False) as z:
            missing = [k for k in ("images", "labels") if k not in z.files]
            if missing:
                raise DataError(f"{path}: no {' or '.join(missing)} array (needs 'images' "
                                f"uint8 NHWC and 'labels'; has {', '.join(z.files) or 'nothing'})")
            images, labels = z["images"], z["labels"]
    except DataError:
        raise
    except Exception as exc:  # noqa: BLE001 - not an npz, truncated, or object arrays
        raise DataError(f"{path}: not a readable .npz of arrays ({exc.__class__.__name__}: "
                        f"{str(exc)[:120]})") from exc
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise DataError(f"{path}: images must be uint8 RGB of shape (N, H, W, 3), got "
                        f"{images.dtype} {images.shape}")
    if labels.shape != (len(images),) or not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"{path}: labels must be {len(images)} integers, got {labels.dtype} "
                        f"{labels.shape}")
    if len(labels) and labels.min() < 0:
        raise DataError(f"{path}: negative label {int(labels.min())}")
    if len(labels) and num_classes is not None and labels.max() >= num_classes:
        raise DataError(f"{path}: labels up to {int(labels.max())} do not fit the {num_classes} "
                        f"classes of {dataset_root}")
    return images.shape, labels


def npz_source(folder: str | Path, classes: Optional[list[str]] = None,
               num_samples: Optional[int] = None, num_test_samples: Optional[int] = None,
               per_class: Optional[int] = None, seed: int = 0) -> SourceSpec:
    """A folder of ``.npz`` files (``images`` uint8 NHWC, ``labels``); the split is the file name
    without a trailing ``_<digits>`` chunk number: ``train_00.npz`` -> ``train``,
    ``test_mixed_rand.npz`` -> ``test_mixed_rand``. Each split is written in a seeded random
    order (files are often grouped by class), after ``per_class`` keeps the first K images of
    each class and before the ``num_samples`` cap."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"--from {folder}: not a directory")
    files = sorted(folder.glob("*.npz"))
    if not files:
        raise DataError(f"--from {folder}: no .npz files found (expected e.g. train_00.npz)")
    by_split: dict[str, list[Path]] = defaultdict(list)
    for f in files:
        by_split[re.sub(r"_\d+$", "", f.stem)].append(f)
    image_size: Optional[int] = None
    labels: dict[str, np.ndarray] = {}
    for split, paths in by_split.items():
        parts = []
        for p in paths:
            shape, part = check_image_npz(p, len(classes) if classes else None)
            image_size = min(image_size or shape[1], shape[1], shape[2]) if shape[0] else image_size
            parts.append(part)
        labels[split] = np.concatenate(parts)
    label_max = max((int(v.max()) for v in labels.values() if len(v)), default=-1)
    if label_max < 0:
        raise DataError(f"--from {folder}: the .npz files hold no images")
    assert image_size is not None  # set by the first file that holds images
    classes = classes or [str(i) for i in range(label_max + 1)]

    def order(split: str) -> np.ndarray:
        """Indices into the split's concatenated files, in the order they are written."""
        index = np.arange(len(labels[split]))
        if per_class is not None:
            index = np.concatenate([index[labels[split] == c][:per_class]
                                    for c in range(len(classes))])
        index = np.random.default_rng([seed, zlib.crc32(split.encode())]).permutation(index)
        cap = num_samples if split == "train" else num_test_samples
        return index[:cap] if cap is not None else index

    def stream(split: str, index: np.ndarray) -> Iterator[Sample]:
        images = np.concatenate([np.load(p, allow_pickle=False)["images"]
                                 for p in by_split[split]])
        for n, i in enumerate(index):
            yield Sample(f"{split}{n:07d}", int(labels[split][i]), image=images[i])

    splits = {}
    for split in by_split:
        index = order(split)
        splits[split] = (len(index), stream(split, index))
    return SourceSpec(classes, image_size, splits)


def cifar10_source(folder: Optional[str | Path], download_root: str | Path, **kw) -> SourceSpec:
    """CIFAR-10 from a local ``.npz`` folder, or through torchvision's downloader when online."""
    if folder is not None:
        return npz_source(folder, classes=CIFAR10_CLASSES, **kw)
    from torchvision.datasets import CIFAR10

    out = Path(download_root) / "cifar10-npz"
    if not (out / "test.npz").is_file():
        out.mkdir(parents=True, exist_ok=True)
        for split, train in (("train", True), ("test", False)):
            try:
                ds = CIFAR10(str(Path(download_root) / "cifar10-download"), train=train,
                             download=True)
            except Exception as exc:  # offline: say how to use a local copy instead
                raise DataError(f"CIFAR-10 download failed ({exc.__class__.__name__}); pass "
                                "--from DIR with a folder of .npz files (e.g. "
                                "../shared/data/cifar10)") from exc
            np.savez(out / f"{split}.npz", images=ds.data, labels=np.asarray(ds.targets))
    return npz_source(out, classes=CIFAR10_CLASSES, **kw)


def imagefolder_source(root: str | Path, image_size: Optional[int] = None,
                       num_samples: Optional[int] = None, num_test_samples: Optional[int] = None,
                       per_class: Optional[int] = None, seed: int = 0) -> SourceSpec:
    """A class-per-folder tree (ImageNet layout): ``root/<class>/*.jpg``, or ``root/train`` and
    ``root/val`` (stored as ``test``) each holding class folders. JPEG/PNG files pass through
    unchanged unless ``image_size`` asks to resize the shorter side."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"--from {root}: not a directory")
    if (root / "train").is_dir():
        split_dirs = {"train": root / "train"}
        for name in ("val", "test"):
            if (root / name).is_dir():
                split_dirs["test"] = root / name
    else:
        split_dirs = {"train": root}
    classes = sorted(d.name for d in split_dirs["train"].iterdir() if d.is_dir())
    if not classes:
        raise DataError(f"--from {split_dirs['train']}: no class folders found")
    files: dict[str, list[tuple[Path, int]]] = {}
    for split, d in split_dirs.items():
        items = []
        for label, cls in enumerate(classes):
            found = sorted(p for p in (d / cls).glob("*") if p.suffix.lower() in IMAGE_EXTS) \
                if (d / cls).is_dir() else []
            items += [(p, label) for p in found[:per_class]]
        # Written in a seeded random order, so that shards mix classes (the folders are
        # grouped by class) and a cap keeps a sample of every class.
        random.Random(f"{seed}/{split}").shuffle(items)
        cap = num_samples if split == "train" else num_test_samples
        files[split] = items[:cap] if cap is not None else items
    if not files["train"]:
        raise DataError(f"--from {root}: no images found (extensions: {', '.join(sorted(IMAGE_EXTS))})")

    from PIL import Image

    skipped: list[str] = []

    def readable_size(path: Path) -> Optional[int]:
        try:
            with Image.open(path) as im:
                return min(im.size)
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
            return None

    sizes = [s for s in map(readable_size, (p for p, _ in files["train"][:1000])) if s]
    if not image_size and not sizes:
        raise DataError(f"--from {root}: none of the first images can be read")
    min_side = image_size or min(sizes)

    def encode(path: Path) -> tuple[bytes, str]:
        ext = path.suffix.lower().lstrip(".")
        with Image.open(path) as im:
            if image_size is None and ext in ("jpg", "jpeg", "png"):
                im.verify()  # pass the file through unchanged, but only if it decodes
                return path.read_bytes(), "jpg" if ext == "jpeg" else ext
            rgb = im.convert("RGB")
            if image_size is not None:
                scale = image_size / min(rgb.size)
                rgb = rgb.resize((max(image_size, round(rgb.width * scale)),
                                  max(image_size, round(rgb.height * scale))),
                                 Image.Resampling.BICUBIC)
            buf = io.BytesIO()
            rgb.save(buf, format="JPEG", quality=95)
            return buf.getvalue(), "jpg"

    def stream(split: str) -> Iterator[Sample]:
        # One unreadable file must not end a long conversion: it is skipped and counted, like
        # a corrupt sample in training.
        for i, (path, label) in enumerate(files[split]):
            try:
                data, ext = encode(path)
            # Pillow's decompression-bomb limit stays: such a file is one more unreadable input
            except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
                skipped.append(f"{path} ({exc.__class__.__name__})")
                continue
            yield Sample(f"{split}{i:08d}", label, encoded=data, ext=ext,
                         meta={"file": str(path.relative_to(root))})

    return SourceSpec(classes, min_side,
                      {split: (len(items), stream(split)) for split, items in files.items()},
                      skipped)


def _per_class_stream(it: Iterator[Sample], k: int, num_classes: int) -> tuple[int, Iterator[Sample]]:
    """Keep the first ``k`` samples of each class, in order. The count is an upper bound until
    the stream is consumed; the writer records the true number."""
    def gen() -> Iterator[Sample]:
        seen: dict[int, int] = defaultdict(int)
        for s in it:
            if seen[s.label] < k:
                seen[s.label] += 1
                yield s
    return k * num_classes, gen()
