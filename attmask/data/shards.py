"""WebDataset tar shards and their ``dataset.json`` manifest.

Layout: ``DIR/<split>-%06d.tar`` holding per sample ``<key>.png|jpg`` (image), ``<key>.cls``
(label), optionally ``<key>.fg.png`` (foreground mask) and ``<key>.json`` (metadata), plus
``DIR/dataset.json``::

    {"format": "attmask-shards/1", "classes": [...], "image_size": PX,
     "splits": {SPLIT: {"num_samples": N, "shards": [{"file", "num_samples", "sha256"}]}},
     "source": ..., "args": {...}, "val": {"from": "train", "fraction" | "per_class", ...}}

``val`` is held out of the training split while it is written (``attmask.data.holdout``).

The manifest is written last, so its presence means the shards are complete; re-running with the
same arguments finds it and does nothing.
"""
from __future__ import annotations

import hashlib
import io
import json
import math
import os
import shutil
import subprocess
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import webdataset as wds
from PIL import Image

from attmask.data.holdout import VAL_SPLIT, Holdout
from attmask.data.sources import Sample, SourceSpec
from attmask.errors import DataError

MANIFEST = "dataset.json"
FORMAT = "attmask-shards/1"
MAX_DEFAULT_SHARD = 5000


def default_shard_size(num_samples: int) -> int:
    """At least 8 shards per split where the split has at least 8 samples."""
    return max(1, min(MAX_DEFAULT_SHARD, math.ceil(num_samples / 8)))


def existing_manifest(out: str | Path, source: str, args: dict[str, Any]) -> Optional[dict]:
    """The manifest in ``out`` if it was written for this source and these arguments and all its
    shards are present (then there is nothing to redo), else None."""
    path = Path(out) / MANIFEST
    try:
        old = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    complete = all((Path(out) / s["file"]).is_file()
                   for sp in old.get("splits", {}).values() for s in sp["shards"])
    same = old.get("source") == source and old.get("args") == args
    return old if same and complete else None


def write_shards(spec: SourceSpec, out: str | Path, *, source: str, args: dict[str, Any],
                 shard_size: Optional[int] = None, holdout: Optional[Holdout] = None) -> dict:
    """Write every split of ``spec`` and then the manifest; returns the manifest. With a
    ``holdout``, the ``val`` split is carved out of ``train`` as it is written.

    Everything is written into a staging directory beside ``out`` and swapped in only once the
    whole dataset is complete, so a failure (a bad label, a full disk, an interrupt) leaves the
    dataset that was in ``out`` before untouched and loadable.
    """
    out = Path(out)
    staging = out.parent / f".{out.name}.partial-{os.getpid()}"
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        for stale in out.parent.glob(f".{out.name}.partial-*"):  # left by a killed run
            if not _alive(stale.name.rsplit("-", 1)[-1]):
                shutil.rmtree(stale, ignore_errors=True)
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
    except OSError as exc:
        raise DataError(f"--out {out}: cannot write beside it ({exc.strerror}: "
                        f"{exc.filename})") from exc
    try:
        manifest = _write_all(spec, staging, source, args, shard_size, holdout)
        _swap_in(staging, out)
    except OSError as exc:  # a full disk, a quota: what was in out is still there
        reason = exc.strerror or exc.__class__.__name__
        raise DataError(f"--out {out}: cannot write {exc.filename or staging} ({reason}); the "
                        f"dataset that was in {out} is unchanged and the partial copy was "
                        "removed: free space and rerun the same command") from exc
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return manifest


def _alive(pid: str) -> bool:
    try:
        os.kill(int(pid), 0)
    except (ValueError, ProcessLookupError):
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def _write_all(spec: SourceSpec, out: Path, source: str, args: dict[str, Any],
               shard_size: Optional[int], holdout: Optional[Holdout]) -> dict:
    splits, has_fg = {}, False
    for split, (count, samples) in spec.splits.items():
        size = shard_size or default_shard_size(count)
        writers = {split: _SplitWriter(out, split, size, len(spec.classes))}
        if split == "train" and holdout is not None:  # val: carved from train as it streams
            writers[VAL_SPLIT] = _SplitWriter(out, VAL_SPLIT, size, len(spec.classes))
        for sample in samples:
            held = holdout is not None and VAL_SPLIT in writers and holdout.take(sample.key,
                                                                                 sample.label)
            writers[VAL_SPLIT if held else split].write(sample)
        for name, writer in writers.items():
            writer.close()
            has_fg |= writer.has_fg
            if writer.total == 0 and name == VAL_SPLIT:  # too few images to hold any out
                continue
            if writer.total == 0:
                raise DataError(f"split {name!r} of source {source!r} is empty")
            splits[name] = {"num_samples": writer.total, "shards": writer.shards}
    manifest = {"format": FORMAT, "source": source, "args": args, "classes": spec.classes,
                "image_size": spec.image_size, "has_fg": has_fg, "splits": splits,
                "skipped_inputs": spec.skipped}
    if holdout is not None:
        manifest["val"] = holdout.record()
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return manifest


def _swap_in(staging: Path, out: Path) -> None:
    """Replace ``out``'s dataset files (shards and manifest) by the staged ones. Other files a
    user keeps in ``out`` stay. The manifest goes last, so it never describes missing shards."""
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST).unlink(missing_ok=True)
    for old in out.glob("*-??????.tar"):  # shard names only: other files in out stay
        old.unlink()
    for new in sorted(staging.glob("*.tar")):
        os.replace(new, out / new.name)
    os.replace(staging / MANIFEST, out / MANIFEST)


class _SplitWriter:
    """One split's shards, written as samples arrive; ``close`` seals the last one."""

    def __init__(self, out: Path, split: str, shard_size: int, num_classes: int) -> None:
        self.out, self.split, self.shard_size, self.num_classes = out, split, shard_size, num_classes
        self.shards: list[dict] = []
        self.total, self.current, self.has_fg = 0, 0, False
        self.writer: Optional[wds.TarWriter] = None

    def _seal(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.shards[-1]["sha256"] = sha256_file(self.out / self.shards[-1]["file"])
            self.writer = None

    def write(self, sample: Sample) -> None:
        if not 0 <= sample.label < self.num_classes:
            raise DataError(f"sample {sample.key}: label {sample.label} outside the "
                            f"{self.num_classes} classes")
        if self.writer is None or self.current >= self.shard_size:
            self._seal()
            name = f"{self.split}-{len(self.shards):06d}.tar"
            self.writer = wds.TarWriter(str(self.out / name))
            self.shards.append({"file": name, "num_samples": 0, "sha256": None})
            self.current = 0
        assert self.writer is not None  # opened above
        self.writer.write(encode_sample(sample))
        self.has_fg |= sample.fg is not None
        self.shards[-1]["num_samples"] += 1
        self.current += 1
        self.total += 1

    def close(self) -> None:
        self._seal()


def encode_sample(sample: Sample) -> dict[str, Any]:
    record: dict[str, Any] = {"__key__": sample.key, "cls": str(sample.label).encode()}
    if sample.encoded is not None:
        record[sample.ext] = sample.encoded
    else:
        assert sample.image is not None  # a sample holds its bytes or its pixels
        record["png"] = png_bytes(sample.image)
    if sample.fg is not None:
        record["fg.png"] = png_bytes((sample.fg.astype(np.uint8) * 255))
    if sample.meta:
        record["json"] = json.dumps(sample.meta).encode()
    return record


def png_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# ----------------------------------------------------------------------------------------------
# Reading


def is_url(path: str) -> bool:
    return "://" in str(path) and not str(path).startswith("file://")


@dataclass
class Dataset:
    """A loaded manifest: where the shards are and what they hold."""

    root: str
    manifest: dict

    @property
    def classes(self) -> list[str]:
        return self.manifest["classes"]

    @property
    def image_size(self) -> int:
        return int(self.manifest["image_size"])

    @property
    def splits(self) -> list[str]:
        return list(self.manifest["splits"])

    def num_samples(self, split: str) -> int:
        return int(self._split(split)["num_samples"])

    def has_fg(self) -> bool:
        return bool(self.manifest.get("has_fg"))

    def _split(self, split: str) -> dict:
        splits = self.manifest["splits"]
        if split not in splits:
            raise DataError(f"split {split!r} not in {self.root}/{MANIFEST}; available: "
                            f"{', '.join(splits)}")
        if not splits[split]["shards"] or not splits[split]["num_samples"]:
            raise DataError(f"split {split!r} in {self.root}/{MANIFEST} is empty")
        return splits[split]

    def shard_urls(self, split: str) -> list[str]:
        return [url for url, _ in self.shards(split)]

    def shards(self, split: str) -> list[tuple[str, int]]:
        """(url, number of samples) of every shard of ``split``."""
        return [(_join(self.root, s["file"]), int(s.get("num_samples", 0)))
                for s in self._split(split)["shards"]]

    def check_shards(self, split: str, verify: bool = True) -> None:
        """Every local shard must exist; with ``verify`` its sha256 must match the manifest."""
        for shard in self._split(split)["shards"]:
            url = _join(self.root, shard["file"])
            if is_url(url):
                continue  # remote shards are checked by the transport, not hashed here
            path = Path(url.removeprefix("file://"))
            if not path.is_file():
                raise DataError(f"shard missing: {path} (listed in {self.root}/{MANIFEST})")
            if verify and shard.get("sha256") and sha256_file(path) != shard["sha256"]:
                raise DataError(f"shard {path}: sha256 does not match {MANIFEST} (corrupt or "
                                "changed; re-run prepare-data, or set "
                                "data.verify_checksums=false to skip the check)")


def load_dataset(path: str | Path) -> Dataset:
    """Read ``path/dataset.json`` (``path`` a directory, an http(s)/file URL, or s3:// / gs://
    through the AWS CLI / gsutil)."""
    root = str(path).rstrip("/")
    url = _join(root, MANIFEST)
    try:
        if root.startswith(("s3://", "gs://")):  # the same tools that stream the shards
            cmd = (["aws", "s3", "cp", "--quiet", url, "-"] if root.startswith("s3://")
                   else ["gsutil", "cat", url])
            text = subprocess.run(cmd, capture_output=True, check=True, timeout=120).stdout.decode()
        elif is_url(root):
            with urllib.request.urlopen(url, timeout=30) as r:
                text = r.read().decode()
        else:
            text = Path(url.removeprefix("file://")).read_text()
    except (OSError, ValueError, subprocess.SubprocessError) as exc:
        raise DataError(f"manifest not found or unreadable: {url} ({exc.__class__.__name__}); "
                        "create it with: python run_pipeline.py prepare-data --out DIR") from exc
    try:
        manifest = json.loads(text)
    except ValueError as exc:
        raise DataError(f"manifest {url} is not JSON ({exc})") from exc
    problem = manifest_problem(manifest)
    if problem:
        raise DataError(f"manifest {url} is not a valid {FORMAT} manifest: {problem}")
    return Dataset(root, manifest)


def manifest_problem(m: Any) -> Optional[str]:
    """What is wrong with a parsed manifest's structure, or None: checked once on loading so
    that no later reader fails on a missing or mistyped entry."""
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        return f"expected an object with \"format\": \"{FORMAT}\""
    classes, size, splits = m.get("classes"), m.get("image_size"), m.get("splits")
    if not isinstance(classes, list) or not classes:
        return "'classes' must be a non-empty list of class names"
    if not isinstance(size, int) or isinstance(size, bool) or size < 1:
        return f"'image_size' must be a positive integer, got {size!r}"
    if not isinstance(splits, dict) or not splits:
        return "'splits' must map split names to their shards"
    for name, split in splits.items():
        if not isinstance(split, dict) or not isinstance(split.get("shards"), list):
            return f"split {name!r} needs a 'shards' list"
        if not isinstance(split.get("num_samples"), int):
            return f"split {name!r} needs an integer 'num_samples'"
        for i, shard in enumerate(split["shards"]):
            if not isinstance(shard, dict) or not isinstance(shard.get("file"), str):
                return f"split {name!r} shard {i} has no 'file' name"
    return None


def _join(root: str, name: str) -> str:
    return f"{root}/{name}"
