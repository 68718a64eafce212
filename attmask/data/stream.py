"""Streaming input from shards: training (shuffled, infinite, multi-crop) and evaluation
(deterministic, every sample exactly once).

A *reader* is one (rank, dataloader worker) pair. Each reader gets an equal share of the
samples: the shards are dealt out whole as far as they divide evenly, and the remaining shards
(all of them when there are fewer shards than readers) are read by every reader, each keeping
every n-th sample. The training stream makes one shuffled pass over its share per cycle, so an
epoch of ``samples // global batch`` steps sees each sample at most once, whatever the ratio of
shards to readers; the loader cuts each epoch to the same number of steps on every rank (DDP
needs equal step counts).
"""
from __future__ import annotations

import functools
import io
import itertools
import logging
import multiprocessing
import os
import random
import threading
import time
from dataclasses import dataclass
from typing import Any, Collection, Iterable, Iterator, Optional, Sequence

import numpy as np
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from attmask.config import Config
from attmask.data.shards import Dataset
from attmask.data.transforms import (
    EvalTransform,
    MultiCropTransform,
    collate_views,
    pretraining_transform,
)
from attmask.errors import DataError

log = logging.getLogger(__name__)
MIN_SEEN_FOR_THRESHOLD = 100


@dataclass
class DecodedSample:
    key: str
    image: torch.Tensor  # uint8 (3, H, W)
    label: int
    fg: Optional[torch.Tensor]  # bool (H, W) or None
    small: bool = False  # smaller than the global crop: the random resized crop upsamples it


def stream_url(url: str) -> str:
    """Map object-store URLs onto webdataset's ``pipe:`` transport (http/gs work natively)."""
    if url.startswith("s3://"):
        return f"pipe:aws s3 cp --quiet {url} -"
    return url.removeprefix("file://")


def reader_identity(rank: int, world_size: int) -> tuple[int, int]:
    info = get_worker_info()
    workers, worker = (info.num_workers, info.id) if info else (1, 0)
    return rank * workers + worker, world_size * workers


def split_shards(shards: list[tuple[str, int]], reader: int, readers: int
                 ) -> tuple[list[str], list[str]]:
    """This reader's own shards (read whole) and the shared rest (every reader keeps every
    ``readers``-th sample of it): full-size shards are dealt out as far as they divide evenly,
    the others (a short last shard, the remainder) are shared, so shares differ by at most one
    sample."""
    full = max(n for _, n in shards)
    whole = [url for url, n in shards if n == full]
    bulk = len(whole) - len(whole) % readers
    return whole[reader:bulk:readers], whole[bulk:] + [url for url, n in shards if n != full]


def reader_samples(own: list[str], shared: list[str], reader: int, readers: int
                   ) -> Iterator[dict]:
    """One pass over a reader's share: its own shards, then its stride of the shared ones (which
    every reader must list in the same order)."""
    yield from read_samples(own)
    yield from read_samples(shared, readers, reader)


def read_samples(urls: Iterable[str], stride: Optional[int] = None, reader: int = 0
                 ) -> Iterator[dict]:
    """Raw webdataset samples of the given shards (with ``stride``: only every ``stride``-th,
    from ``reader``); an unreadable shard is named in the error."""
    index = 0
    for url in urls:
        try:
            for sample in wds.tarfile_samples([{"url": stream_url(url)}]):
                if stride is None or index % stride == reader:
                    yield sample
                index += 1
        except DataError:
            raise
        except Exception as exc:  # noqa: BLE001 - any transport/tar failure means a bad shard
            raise DataError(f"shard {url}: unreadable ({exc.__class__.__name__}: {exc})"[:400]) \
                from exc


def stratified_subset(labels: Sequence[int], limit: Optional[int], seed: int = 0
                      ) -> Optional[list[int]]:
    """Indices of a seeded, class-stratified subset of ``limit`` items (classes take turns, so
    their counts differ by at most one where they have enough items); None when ``limit`` keeps
    everything. The same labels, limit and seed always give the same subset."""
    if limit is None or limit >= len(labels):
        return None
    rng = random.Random(seed)
    by_class: dict[int, list[int]] = {}
    for i, label in enumerate(labels):
        by_class.setdefault(int(label), []).append(i)
    queues = [rng.sample(members, len(members)) for _, members in sorted(by_class.items())]
    chosen: list[int] = []
    for turn in itertools.count():
        if len(chosen) >= limit or not any(len(q) > turn for q in queues):
            break
        chosen += [q[turn] for q in queues if len(q) > turn][:limit - len(chosen)]
    return sorted(chosen)


def stratified_keys(dataset: Dataset, split: str, limit: Optional[int], seed: int = 0
                    ) -> Optional[frozenset[str]]:
    """Sample keys of a class-stratified subset of ``split`` (see :func:`stratified_subset`),
    chosen from the labels alone (one read of the shards, no image decoded); None for all."""
    if limit is None or limit >= dataset.num_samples(split):
        return None
    keys, labels = [], []
    for s in read_samples(dataset.shard_urls(split)):
        keys.append(str(s.get("__key__")))
        labels.append(int(s.get("cls", -1)))
    chosen = stratified_subset(labels, limit, seed)
    return None if chosen is None else frozenset(keys[i] for i in chosen)


class Decoder:
    """Decode image, label and mask; skip and count corrupt samples, reject wrong ones."""

    def __init__(self, num_classes: int, min_size: int, max_corrupt_fraction: float) -> None:
        self.num_classes, self.min_size = num_classes, min_size
        self.max_corrupt_fraction = max_corrupt_fraction
        self.seen = self.skipped = 0  # reads, for the corrupt share (a pass re-reads)
        self.bad: list[str] = []  # distinct corrupt samples, in the order they were found
        self._bad_keys: set[str] = set()  # the same, for a membership test without a scan
        self.last_bad = ""

    def __call__(self, samples: Iterable[dict]) -> Iterator[DecodedSample]:
        for s in samples:
            self.seen += 1
            key = f"{s.get('__url__', '?')}:{s.get('__key__', '?')}"
            try:
                data = s.get("png") or s.get("jpg") or s.get("jpeg")
                if data is None:
                    raise ValueError("no png/jpg member")
                image = torch.from_numpy(_pil_decode(data, "RGB")).permute(2, 0, 1)
                label = int(s["cls"])
                fg = torch.from_numpy(_pil_decode(s["fg.png"], "L") > 127) if "fg.png" in s else None
            except Exception as exc:  # noqa: BLE001 - undecodable sample: skip, count, warn once
                self._skip(key, exc)
                continue
            finally:
                self._check_share(key)
            if not 0 <= label < self.num_classes:
                raise DataError(f"sample {key}: label {label} outside the manifest's "
                                f"{self.num_classes} classes")
            yield DecodedSample(str(s.get("__key__")), image, label, fg,
                                min(image.shape[1:]) < self.min_size)
        self._check_share("end of stream", at_end=True)

    def _skip(self, key: str, exc: Exception) -> None:
        self.skipped += 1
        self.last_bad = key
        if key not in self._bad_keys:
            self._bad_keys.add(key)
            self.bad.append(key)
        if self.skipped == 1:
            log.warning("skipping corrupt sample %s (%s); further ones are only counted", key,
                        str(exc)[:200])

    def _check_share(self, where: str, at_end: bool = False) -> None:
        if not self.skipped or (self.seen < MIN_SEEN_FOR_THRESHOLD and not at_end):
            return
        if self.skipped / self.seen > self.max_corrupt_fraction:
            raise DataError(f"{self.skipped} of {self.seen} samples are corrupt (last: "
                            f"{self.last_bad}); more than "
                            f"data.max_corrupt_fraction={self.max_corrupt_fraction}")


def _pil_decode(data: bytes, mode: str) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as im:
        return np.array(im.convert(mode))  # a writable copy for torch.from_numpy


def _shuffle(items: Iterable[Any], size: int, rng: random.Random) -> Iterator[Any]:
    buf: list[Any] = []
    for item in items:
        if len(buf) < size:
            buf.append(item)
            continue
        i = rng.randrange(size)
        yield buf[i]
        buf[i] = item
    rng.shuffle(buf)
    yield from buf


class TrainStream(IterableDataset):
    """Infinite multi-crop batches for one rank: ``{"global": (2,B,3,S,S), "local": (L,B,3,s,s),
    "label": (B,), "key": [...], "skipped": [...], "small": int}`` (with ``colour_on=batch``
    also ``"colour": (2+L,B,P)``, the crops uint8: ``transform.finish`` completes them);
    ``skipped`` names the corrupt
    samples first found since the last batch (a sample re-read on a later pass is not named
    again); ``small`` counts the images smaller than ``min_size`` (upsampled by the crop, as in
    the official code, instead of stopping a long run)."""

    def __init__(self, dataset: Dataset, split: str, transform: MultiCropTransform,
                 batch_size: int, *, rank: int = 0, world_size: int = 1, seed: int = 0,
                 epoch: int = 0, shuffle_buffer: int = 1000, min_size: int = 0,
                 max_corrupt_fraction: float = 0.01) -> None:
        self.shards = dataset.shards(split)
        self.num_classes = len(dataset.classes)
        self.transform, self.batch_size = transform, batch_size
        self.rank, self.world_size, self.seed, self.epoch = rank, world_size, seed, epoch
        self.shuffle_buffer, self.min_size = shuffle_buffer, min_size
        self.max_corrupt_fraction = max_corrupt_fraction

    def __iter__(self) -> Iterator[dict]:
        reader, readers = reader_identity(self.rank, self.world_size)
        rng = random.Random(f"{self.seed}/{self.epoch}/{reader}")
        # Crops draw from a private state per (seed, epoch, reader), never from the global RNG
        # the training step also uses: the n-th batch of an epoch is then the same whether the
        # epoch runs straight through or is resumed mid-way (the skipped batches are replayed).
        crop_state = torch.Generator().manual_seed(rng.getrandbits(63)).get_state()
        decoder = Decoder(self.num_classes, self.min_size, self.max_corrupt_fraction)

        # One shard assignment per epoch (same shuffle on every reader, so it is disjoint);
        # each pass then reads the reader's own shards in its own order, and the shared ones in
        # an order common to all readers (their sample stride must partition the same sequence).
        shards = list(self.shards)
        random.Random(f"{self.seed}/{self.epoch}").shuffle(shards)
        own, shared = split_shards(shards, reader, readers)

        def one_pass(cycle: int) -> Iterator[DecodedSample]:
            mine, common = list(own), list(shared)
            random.Random(f"{self.seed}/{self.epoch}/{reader}/{cycle}").shuffle(mine)
            random.Random(f"{self.seed}/{self.epoch}/shared/{cycle}").shuffle(common)
            # The buffer is emptied at the end of every pass, so no sample of the next pass
            # comes out before every sample of this one.
            yield from _shuffle(decoder(reader_samples(mine, common, reader, readers)),
                                max(1, self.shuffle_buffer), rng)

        batch, reported = [], 0
        for s in itertools.chain.from_iterable(map(one_pass, itertools.count())):
            with torch.random.fork_rng(devices=[]):
                torch.set_rng_state(crop_state)
                views = self.transform(s.image)
                crop_state = torch.get_rng_state()
            batch.append((views, s.label, s.key, s.small))
            if len(batch) == self.batch_size:
                yield {**collate_views([b[0] for b in batch]),
                       "label": torch.tensor([b[1] for b in batch]),
                       "key": [b[2] for b in batch], "skipped": decoder.bad[reported:],
                       "small": sum(b[3] for b in batch)}
                batch, reported = [], len(decoder.bad)


class EvalStream(IterableDataset):
    """Each sample exactly once across ranks and workers, in a fixed order:
    ``{"image": (B,3,S,S), "label": (B,), "key": [...], "fg": (B,S,S) bool (if present)}``."""

    def __init__(self, dataset: Dataset, split: str, transform: EvalTransform, batch_size: int,
                 *, rank: int = 0, world_size: int = 1, max_corrupt_fraction: float = 0.01,
                 keys: Optional[Collection[str]] = None) -> None:
        self.keys = keys  # only these samples (e.g. a stratified subset), or all
        self.shards = dataset.shards(split)
        self.num_classes = len(dataset.classes)
        self.transform, self.batch_size = transform, batch_size
        self.rank, self.world_size = rank, world_size
        self.max_corrupt_fraction = max_corrupt_fraction

    def __iter__(self) -> Iterator[dict]:
        reader, readers = reader_identity(self.rank, self.world_size)
        own, shared = split_shards(self.shards, reader, readers)
        decoder = Decoder(self.num_classes, 0, self.max_corrupt_fraction)
        batch: list[DecodedSample] = []
        raw = reader_samples(own, shared, reader, readers)
        if self.keys is not None:
            raw = (s for s in raw if str(s.get("__key__")) in self.keys)
        for s in itertools.chain(decoder(raw), [None]):
            if s is not None:
                batch.append(s)
            if batch and (s is None or len(batch) == self.batch_size):
                out = {"image": torch.stack([self.transform(b.image) for b in batch]),
                       "label": torch.tensor([b.label for b in batch]),
                       "key": [b.key for b in batch]}
                masks = [self.transform.mask(b.fg) for b in batch if b.fg is not None]
                if len(masks) == len(batch):
                    out["fg"] = torch.stack(masks)
                yield out
                batch = []


def make_loader(stream: IterableDataset, num_workers: int) -> DataLoader:
    # The loader draws its workers' base seed from ``generator``; by default it would take it
    # from the global RNG, so starting a loader (a new epoch, a resume, a monitor) would shift
    # the training step's randomness. Workers start from a forkserver, not a fork of the
    # training process: a fork would carry that process's heap (the model, the optimizer,
    # torch's caches) into every epoch's workers, 1.3 GB each instead of 0.75 (docs/speed.md).
    # The forkserver imports this module (torch, torchvision, webdataset) once when it starts,
    # so each later loader (every epoch, every monitor pass) starts its workers in under a
    # second instead of 3-5 s of imports on 2 cores; it must be set before the server starts.
    if num_workers:
        multiprocessing.set_forkserver_preload([__name__])
    return DataLoader(stream, batch_size=None, num_workers=num_workers,
                      persistent_workers=False, pin_memory=torch.cuda.is_available(),
                      generator=torch.Generator().manual_seed(0),
                      multiprocessing_context="forkserver" if num_workers else None,
                      worker_init_fn=functools.partial(end_with, os.getpid()) if num_workers
                      else None)


def end_with(owner: int, worker_id: int) -> None:
    """Loader worker start-up: end this worker when the process that made the loader is gone.
    PyTorch's own watchdog watches a worker's parent, which for forkserver workers is the
    forkserver; that outlives a trainer killed with SIGKILL (every worker holds the pipe whose
    end would stop it), so without this the workers ran on forever."""
    def watch() -> None:
        while True:
            time.sleep(1.0)
            try:
                os.kill(owner, 0)
            except ProcessLookupError:
                os._exit(0)
            except PermissionError:  # alive (another user's process with that pid)
                pass

    threading.Thread(target=watch, name="owner-watchdog", daemon=True).start()


def train_batches(dataset: Dataset, cfg: Config, *, epoch: int, steps: int, rank: int = 0,
                  world_size: int = 1, skip: int = 0) -> Iterator[dict]:
    """Exactly ``steps - skip`` batches of epoch ``epoch`` (``skip`` resumes mid-epoch)."""
    m, d = cfg.model, cfg.data
    transform = pretraining_transform(cfg)
    stream = TrainStream(dataset, d.split, transform, cfg.train.batch_size_per_worker, rank=rank,
                         world_size=world_size, seed=cfg.train.seed, epoch=epoch,
                         shuffle_buffer=d.shuffle_buffer, min_size=m.image_size,
                         max_corrupt_fraction=d.max_corrupt_fraction)
    return itertools.islice(make_loader(stream, d.num_workers), skip, steps)


def steps_per_epoch(dataset: Dataset, cfg: Config, world_size: int = 1) -> int:
    if cfg.train.steps_per_epoch is not None:
        return cfg.train.steps_per_epoch
    return dataset.num_samples(cfg.data.split) // (cfg.train.batch_size_per_worker * world_size)

