"""Sources -> shards -> streams, and every bad-input case of the data issue."""
import itertools
import json
import os
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image
from torchvision.transforms import v2

from attmask.config import load_config
from attmask.data.prepare import PrepareArgs, prepare_data
from attmask.data.shards import MANIFEST, load_dataset, png_bytes, sha256_file
from attmask.data.stream import (
    EvalStream,
    TrainStream,
    make_loader,
    read_samples,
    stratified_keys,
    stratified_subset,
    train_batches,
)
from attmask.data.synthetic import BACKGROUNDS, FIXED_OBJECT, VARIANTS, ObjectsOnBackgrounds
from attmask.data.transforms import MEAN, STD, EvalTransform, MultiCropTransform, pretraining_transform
from attmask.errors import DataError
from conftest import serve_folder, tiny_config

SHARED_CIFAR = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10"


# ---------------------------------------------------------------------------------- synthetic

def test_synthetic_is_deterministic_by_seed():
    a, b, c = (ObjectsOnBackgrounds(32, seed=s) for s in (0, 0, 1))
    assert np.array_equal(a.sample("train", 5).image, b.sample("train", 5).image)
    assert not np.array_equal(a.sample("train", 5).image, c.sample("train", 5).image)
    assert not np.array_equal(a.sample("train", 5).image, a.sample("test", 5).image)


def test_background_correlates_with_class_in_train():
    gen = ObjectsOnBackgrounds(32, bg_correlation=0.8)
    samples = [gen.sample("train", i) for i in range(1000)]
    match = np.mean([s.meta["background"] == BACKGROUNDS[gen.class_family(s.label)]
                     for s in samples])
    assert 0.77 < match < 0.87  # 0.8 + 0.2 / 10 by chance
    assert set(Counter(s.label for s in samples)) == set(range(10))
    uncorrelated = ObjectsOnBackgrounds(32, bg_correlation=0.0)
    match0 = np.mean([uncorrelated.sample("train", i).meta["background"]
                      == BACKGROUNDS[uncorrelated.sample("train", i).label] for i in range(500)])
    assert match0 < 0.2


def test_variants_are_paired_imagenet9_style():
    gen = ObjectsOnBackgrounds(32)
    v = gen.variants(3)
    assert set(v) == set(VARIANTS)
    fg = v["original"].fg
    assert fg.any() and not fg.all()
    assert len({s.label for s in v.values()}) == 1
    near = fg.copy()  # the anti-aliased rim lies within one pixel of the mask
    for axis in (0, 1):
        for shift in (-1, 1):
            near |= np.roll(fg, shift, axis)
    assert (v["only_fg"].image[~near].max(-1) > 0).mean() < 0.02  # background removed
    assert np.abs(v["only_fg"].image[fg].astype(int) - v["original"].image[fg]).mean() < 30
    assert not v["only_bg"].fg.any()
    label = v["original"].label
    assert v["mixed_same"].meta["background"] == BACKGROUNDS[gen.class_family(label)]
    for name in ("mixed_same", "mixed_rand"):
        assert np.array_equal(v[name].fg, fg)  # same object, other background


def test_fixed_colours_draw_the_same_scenes_in_one_palette():
    random, fixed = (ObjectsOnBackgrounds(32, colours=c) for c in ("random", "fixed"))
    for i in range(20):
        r, f = random.sample("train", i), fixed.sample("train", i)
        assert r.label == f.label and r.meta == f.meta and np.array_equal(r.fg, f.fg)
        assert not np.array_equal(r.image, f.image)
        # grey away from the object (its anti-aliased rim blends the two), cream on it
        near = f.fg | np.roll(f.fg, 1, 0) | np.roll(f.fg, -1, 0)
        near |= np.roll(near, 1, 1) | np.roll(near, -1, 1)
        assert (np.ptp(f.image[~near].astype(int), axis=-1) <= 1).all()
        assert np.abs(f.image[f.fg].astype(int) - np.round(FIXED_OBJECT * 255)).max() <= 60
    assert len({tuple(random.sample("train", i).image[~random.sample("train", i).fg][0])
                for i in range(20)}) > 10  # random colours differ between images


@pytest.mark.parametrize("size", [32, 64, 224])
def test_synthetic_image_sizes(size):
    s = ObjectsOnBackgrounds(size).sample("train", 0)
    assert s.image.shape == (size, size, 3) and s.image.dtype == np.uint8
    assert s.fg.shape == (size, size) and 0.02 < s.fg.mean() < 0.6


# ------------------------------------------------------------------------------------- shards

def test_prepare_synthetic_writes_manifest_and_is_idempotent(synthetic_dir):
    manifest = json.loads((synthetic_dir / MANIFEST).read_text())
    assert manifest["classes"][:3] == ["disk", "square", "triangle"]
    assert manifest["image_size"] == 32 and manifest["has_fg"]
    assert set(manifest["splits"]) == {"train", "val", "test"} | {f"test_{v}" for v in VARIANTS}
    train = manifest["splits"]["train"]
    assert train["num_samples"] + manifest["splits"]["val"]["num_samples"] == 160
    assert len(train["shards"]) == 8
    for shard in train["shards"]:
        assert sha256_file(synthetic_dir / shard["file"]) == shard["sha256"]
    with tarfile.open(synthetic_dir / train["shards"][0]["file"]) as tar:
        names = tar.getnames()
    assert {"train0000000.png", "train0000000.cls", "train0000000.fg.png",
            "train0000000.json"} <= set(names)
    mtime = (synthetic_dir / train["shards"][0]["file"]).stat().st_mtime_ns
    _, written = prepare_data(PrepareArgs(source="synthetic", out=str(synthetic_dir),
                                          num_samples=160, num_test_samples=32, seed=1))
    assert not written
    assert (synthetic_dir / train["shards"][0]["file"]).stat().st_mtime_ns == mtime


def test_prepare_rewrites_when_arguments_change(tmp_path):
    a = PrepareArgs(source="synthetic", out=str(tmp_path), num_samples=20, num_test_samples=4,
                    val_fraction=0)
    prepare_data(a)
    a.num_samples = 30
    manifest, written = prepare_data(a)
    assert written and manifest["splits"]["train"]["num_samples"] == 30
    a.val_fraction = 0.2
    manifest, written = prepare_data(a)
    assert written and manifest["splits"]["val"]["num_samples"] == manifest["val"]["num_samples"]
    assert manifest["splits"]["train"]["num_samples"] + manifest["val"]["num_samples"] == 30


def test_fewer_variant_images_keep_the_test_split_and_the_first_scenes(tmp_path):
    """The main job tests the k-NN on many images and the robustness variants on fewer."""
    whole = tmp_path / "whole"
    prepare_data(PrepareArgs(source="synthetic", out=str(whole), num_samples=20,
                             num_test_samples=12))
    fewer = PrepareArgs(source="synthetic", out=str(tmp_path / "fewer"), num_samples=20,
                        num_test_samples=12, num_variant_samples=5)
    manifest, _ = prepare_data(fewer)
    splits = manifest["splits"]
    assert splits["test"]["num_samples"] == 12 and manifest["args"]["num_variant_samples"] == 5
    assert {splits[f"test_{v}"]["num_samples"] for v in VARIANTS} == {5}
    first = [s["png"] for s in read_samples(load_dataset(whole).shard_urls("test_mixed_rand"))]
    kept = [s["png"] for s in read_samples(load_dataset(fewer.out).shard_urls("test_mixed_rand"))]
    assert kept == first[:5]
    # Left at its default, the option is not in the manifest: folders written before it
    # existed stay current.
    assert "num_variant_samples" not in json.loads((whole / MANIFEST).read_text())["args"]


def test_failed_prepare_leaves_the_existing_dataset_loadable(tmp_path):
    out = tmp_path / "out"
    prepare_data(PrepareArgs(source="synthetic", out=str(out), num_samples=20, num_test_samples=4,
                             val_fraction=0))
    (out / "notes.txt").write_text("mine")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    src = tmp_path / "src"
    src.mkdir()
    rng = np.random.default_rng(0)
    np.savez(src / "train.npz", images=rng.integers(0, 255, (6, 8, 8, 3), dtype=np.uint8),
             labels=np.array([0, 1, 2, 0, 1, 2]))
    np.savez(src / "test.npz", images=rng.integers(0, 255, (3, 8, 8, 3), dtype=np.uint8),
             labels=np.array([0, 1, -1]))  # a bad label, found while writing the test split
    with pytest.raises(DataError, match="label -1"):
        prepare_data(PrepareArgs(source="npz", from_path=str(src), out=str(out), val_fraction=0))
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # nothing lost or added
    assert not list(tmp_path.glob(".out.partial-*"))  # no staging leftovers
    dataset = load_dataset(out)
    dataset.check_shards("train", verify=True)
    assert dataset.num_samples("train") == 20
    # a successful rewrite replaces the shards but keeps the user's other files
    np.savez(src / "test.npz", images=rng.integers(0, 255, (3, 8, 8, 3), dtype=np.uint8),
             labels=np.array([0, 1, 2]))
    manifest, _ = prepare_data(PrepareArgs(source="npz", from_path=str(src), out=str(out),
                                           val_fraction=0))
    assert load_dataset(out).num_samples("train") == 6 and (out / "notes.txt").is_file()
    assert sorted(p.name for p in out.glob("*.tar")) == sorted(
        s["file"] for sp in manifest["splits"].values() for s in sp["shards"])


def write_npz(folder: Path, name: str, n: int, size: int = 8, classes: int = 3, seed: int = 0):
    rng = np.random.default_rng(seed)
    np.savez(folder / name, images=rng.integers(0, 255, (n, size, size, 3), dtype=np.uint8),
             labels=np.arange(n) % classes)


def test_npz_source_splits_by_prefix_with_caps_and_per_class(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    write_npz(src, "train_00.npz", 12)
    write_npz(src, "train_01.npz", 9, seed=1)
    write_npz(src, "test.npz", 6)
    write_npz(src, "test_mixed_rand.npz", 5)
    manifest, _ = prepare_data(PrepareArgs(source="npz", from_path=str(src),
                                           out=str(tmp_path / "out"), val_fraction=0))
    splits = manifest["splits"]
    assert splits["train"]["num_samples"] == 21 and splits["test"]["num_samples"] == 6
    assert splits["test_mixed_rand"]["num_samples"] == 5 and manifest["image_size"] == 8
    assert manifest["classes"] == ["0", "1", "2"]
    per_class, _ = prepare_data(PrepareArgs(source="npz", from_path=str(src), per_class=2,
                                            out=str(tmp_path / "pc"), val_fraction=0))
    assert per_class["splits"]["train"]["num_samples"] == 6
    capped, _ = prepare_data(PrepareArgs(source="npz", from_path=str(src), num_samples=10,
                                         out=str(tmp_path / "cap"), val_fraction=0))
    assert capped["splits"]["train"]["num_samples"] == 10


@pytest.mark.skipif(not (SHARED_CIFAR / "test.npz").is_file(), reason="shared CIFAR-10 absent")
def test_cifar10_from_shared_npz(tmp_path):
    manifest, _ = prepare_data(PrepareArgs(source="cifar10", from_path=str(SHARED_CIFAR),
                                           out=str(tmp_path), num_samples=200,
                                           num_test_samples=50))
    assert manifest["classes"][0] == "airplane" and manifest["image_size"] == 32
    train, val = (manifest["splits"][s]["num_samples"] for s in ("train", "val"))
    assert train + val == 200 and 15 <= val <= 25  # about 10 % of each class held out
    assert manifest["splits"]["test"]["num_samples"] == 50


def test_imagefolder_train_val_layout_passes_files_through(tmp_path):
    root = tmp_path / "imgs"
    for split in ("train", "val"):
        for cls in ("cat", "dog"):
            d = root / split / cls
            d.mkdir(parents=True)
            for i in range(3):
                Image.new("RGB", (40, 36), (i * 40, 10, 200)).save(d / f"{i}.jpg")
    manifest, _ = prepare_data(PrepareArgs(source="imagefolder", from_path=str(root),
                                           out=str(tmp_path / "out"), per_class=2))
    assert manifest["classes"] == ["cat", "dog"] and manifest["image_size"] == 36
    assert manifest["splits"]["train"]["num_samples"] == 4
    assert manifest["splits"]["test"]["num_samples"] == 4
    first = manifest["splits"]["train"]["shards"][0]["file"]
    with tarfile.open(tmp_path / "out" / first) as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith(".jpg"))
        assert tar.extractfile(member).read() == (root / "train" / "cat" / "0.jpg").read_bytes()


@pytest.mark.parametrize("resize", [None, 24])
def test_an_unreadable_image_is_skipped_and_counted_not_fatal(tmp_path, resize):
    root = tmp_path / "imgs"
    for cls in ("cat", "dog"):
        (root / cls).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (40, 36), (i * 40, 10, 200)).save(root / cls / f"{i}.png")
    (root / "dog" / "1.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    (root / "cat" / "2.png").write_bytes(png_header(20_000, 20_000))  # a decompression bomb
    manifest, _ = prepare_data(PrepareArgs(source="imagefolder", from_path=str(root),
                                           out=str(tmp_path / "out"), image_size=resize,
                                           val_fraction=0))
    assert manifest["splits"]["train"]["num_samples"] == 4
    skipped = manifest["skipped_inputs"]
    assert len(skipped) == 2 and any("dog/1.png" in s for s in skipped)
    assert any("cat/2.png (DecompressionBombError)" in s for s in skipped)
    assert load_dataset(tmp_path / "out").num_samples("train") == 4


def png_header(width: int, height: int) -> bytes:
    """A PNG whose header declares ``width`` x ``height`` pixels, with almost no data."""
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return (struct.pack(">I", len(body)) + kind + body
                + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2,
                                                                0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b""))


def test_source_folder_without_images_is_an_error(tmp_path):
    (tmp_path / "empty" / "cls").mkdir(parents=True)
    with pytest.raises(DataError, match="no images found"):
        prepare_data(PrepareArgs(source="imagefolder", from_path=str(tmp_path / "empty"),
                                 out=str(tmp_path / "o")))
    (tmp_path / "none").mkdir()
    with pytest.raises(DataError, match="no .npz files"):
        prepare_data(PrepareArgs(source="npz", from_path=str(tmp_path / "none"),
                                 out=str(tmp_path / "o2")))


# ------------------------------------------------------------------------------------ streams

def loader_keys(stream, workers=2, limit=None):
    keys = []
    for batch in make_loader(stream, workers):
        keys += batch["key"]
        if limit and len(keys) >= limit:
            break
    return keys


def train_keys(ds) -> list[str]:
    """The generated train images' keys minus those held out as val."""
    held = set(loader_keys(EvalStream(ds, "val", EvalTransform(32), 16), workers=0))
    total = ds.num_samples("train") + ds.num_samples("val")
    return [k for k in (f"train{i:07d}" for i in range(total)) if k not in held]


def test_eval_stream_every_sample_once_across_ranks_and_workers(synthetic_dir):
    ds = load_dataset(synthetic_dir)
    per_rank = [loader_keys(EvalStream(ds, "train", EvalTransform(32), 16, rank=r,
                                       world_size=2)) for r in range(2)]
    assert not set(per_rank[0]) & set(per_rank[1])
    assert sorted(per_rank[0] + per_rank[1]) == sorted(train_keys(ds))
    again = loader_keys(EvalStream(ds, "train", EvalTransform(32), 16, rank=0, world_size=2))
    assert again == per_rank[0]  # deterministic order


def test_train_stream_ranks_and_workers_read_disjoint_shards(tmp_path):
    # the stream's mechanics, on 8 equal shards (no val split, which would make them uneven)
    prepare_data(PrepareArgs(source="synthetic", out=str(tmp_path), num_samples=160,
                             num_test_samples=8, seed=1, val_fraction=0))
    ds = load_dataset(tmp_path)
    transform = MultiCropTransform(32, 16, local_number=1)
    def keys(buffer, limit):
        return [loader_keys(TrainStream(ds, "train", transform, 8, rank=r, world_size=2,
                                        shuffle_buffer=buffer), limit=limit) for r in range(2)]

    first_pass = keys(1, 80)  # 8 shards, 2 ranks x 2 workers: 2 shards (40 samples) per reader
    assert len(set(first_pass[0])) == 80 and not set(first_pass[0]) & set(first_pass[1])
    assert len(set(first_pass[0]) | set(first_pass[1])) == 160  # together: everything
    shuffled = keys(16, 240)  # several passes with a shuffle buffer: still disjoint
    assert not set(shuffled[0]) & set(shuffled[1])
    assert shuffled[0][:80] != first_pass[0]


def test_fewer_shards_than_readers_split_by_sample(tmp_path):
    prepare_data(PrepareArgs(source="synthetic", out=str(tmp_path), num_samples=24,
                             num_test_samples=4, shard_size=12, val_fraction=0))
    ds = load_dataset(tmp_path)
    assert len(ds.shard_urls("train")) == 2  # 2 shards, 2 ranks x 2 workers = 4 readers
    per_rank = [loader_keys(EvalStream(ds, "train", EvalTransform(32), 4, rank=r,
                                       world_size=2)) for r in range(2)]
    assert len(per_rank[0]) == len(per_rank[1]) == 12
    assert sorted(per_rank[0] + per_rank[1]) == sorted(f"train{i:07d}" for i in range(24))
    transform = MultiCropTransform(32, 16, local_number=0)
    train_keys = loader_keys(TrainStream(ds, "train", transform, 3, rank=1, world_size=2), limit=6)
    assert len(train_keys) >= 6  # no reader is left empty


@pytest.fixture(scope="module")
def class_sorted(tmp_path_factory):
    """600 images of 20 classes, stored class by class (as many image sets are), in 9 shards."""
    root = tmp_path_factory.mktemp("sorted")
    labels = np.repeat(np.arange(20), 30)
    images = np.random.default_rng(0).integers(0, 255, (600, 16, 16, 3), dtype=np.uint8)
    (root / "src").mkdir()
    np.savez(root / "src" / "train.npz", images=images, labels=labels)
    np.savez(root / "src" / "test.npz", images=images[:40], labels=labels[:40])
    prepare_data(PrepareArgs(source="npz", from_path=str(root / "src"), out=str(root / "ds"),
                             shard_size=70, val_fraction=0))
    return load_dataset(root / "ds")


def test_class_sorted_sources_give_class_mixed_batches(class_sorted):
    assert len(class_sorted.shard_urls("train")) == 9
    stream = TrainStream(class_sorted, "train", MultiCropTransform(16, 8, local_number=0), 60,
                         shuffle_buffer=100)  # a buffer much smaller than the data, as at scale
    for batch in itertools.islice(make_loader(stream, 0), 5):
        # a uniform draw of 60 from 20 classes holds about 19; a class-ordered stream about 3
        assert len(set(batch["label"].tolist())) >= 15


def test_an_epoch_over_ranks_and_workers_sees_every_sample_once(class_sorted):
    """9 shards over 2 ranks x 2 workers: 8 dealt out whole, 1 shared by sample stride; one
    epoch (samples // global batch steps) is one pass over each reader's equal share."""
    transform = MultiCropTransform(16, 8, local_number=0)
    keys = []
    for rank in range(2):
        stream = TrainStream(class_sorted, "train", transform, 30, rank=rank, world_size=2,
                             shuffle_buffer=100)
        keys += [k for b in itertools.islice(make_loader(stream, 2), 10) for k in b["key"]]
    assert len(keys) == 600 and len(set(keys)) == 600


def test_caps_take_a_class_stratified_subset_not_the_first_images(tmp_path):
    """Monitors and --max-train/--max-test on a class-ordered split cover every class."""
    labels = np.repeat(np.arange(20), 30)
    (tmp_path / "src").mkdir()
    np.savez(tmp_path / "src" / "train.npz", labels=labels,
             images=np.zeros((600, 16, 16, 3), np.uint8))
    np.savez(tmp_path / "src" / "test.npz", labels=labels[:40],
             images=np.zeros((40, 16, 16, 3), np.uint8))
    # shards written in the source's class order (per_class keeps it; no cap), as older
    # datasets and other tools write them
    from attmask.data.shards import write_shards
    from attmask.data.sources import Sample, SourceSpec

    def sorted_stream():
        for i, label in enumerate(labels):
            yield Sample(f"train{i:07d}", int(label), image=np.zeros((16, 16, 3), np.uint8))
    spec = SourceSpec([str(c) for c in range(20)], 16, {"train": (600, sorted_stream())})
    write_shards(spec, tmp_path / "ds", source="npz", args={})
    ds = load_dataset(tmp_path / "ds")
    keys = stratified_keys(ds, "train", 100)
    assert keys == stratified_keys(ds, "train", 100) and len(keys) == 100  # fixed subset
    got = Counter(int(b) for batch in make_loader(EvalStream(ds, "train", EvalTransform(16), 32,
                                                             keys=keys), 0)
                  for b in batch["label"])
    assert got == {c: 5 for c in range(20)}
    assert stratified_keys(ds, "train", 600) is None
    assert stratified_subset([0, 0, 0, 1], 2) in ([0, 3], [1, 3], [2, 3])


def test_eval_view_is_the_official_resize_and_centre_crop():
    from torchvision.transforms import v2

    image = torch.randint(0, 256, (3, 48, 64), dtype=torch.uint8)  # landscape, larger than 32
    fg = torch.zeros(48, 64, dtype=torch.bool)
    fg[:, :8] = True  # a stripe at the left edge, outside the centre crop
    t = EvalTransform(32)
    expected = v2.functional.center_crop(v2.functional.resize(
        image, 36, interpolation=v2.InterpolationMode.BICUBIC, antialias=True), [32, 32])
    assert torch.equal(t(image), v2.Compose([v2.ToDtype(torch.float32, scale=True),
                                             v2.Normalize(MEAN, STD)])(expected))
    assert t.mask(fg).shape == (32, 32) and not t.mask(fg).any()  # the aspect ratio is kept
    small = torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8)  # already at the input size
    assert t(small).shape == (3, 32, 32)


def test_train_batches_have_the_engine_layout(synthetic_dir):
    ds = load_dataset(synthetic_dir)
    stream = TrainStream(ds, "train", MultiCropTransform(32, 16, local_number=3), 5)
    batch = next(iter(make_loader(stream, 0)))
    assert batch["global"].shape == (2, 5, 3, 32, 32) and batch["global"].dtype == torch.float32
    assert batch["local"].shape == (3, 5, 3, 16, 16)
    assert batch["label"].shape == (5,) and batch["skipped"] == []


@pytest.mark.parametrize("workers", [0, 1])
def test_a_resumed_epoch_replays_the_same_batches(synthetic_dir, workers):
    """Batch n of an epoch does not depend on skipping (resume) or on the trainer's RNG use."""
    cfg = tiny_config(f"data.path={synthetic_dir}", f"data.num_workers={workers}")
    ds = load_dataset(synthetic_dir)
    straight = []
    for b in train_batches(ds, cfg, epoch=1, steps=5):
        straight.append(b)
        torch.rand(100)  # a training step draws from the global RNG between batches
    torch.manual_seed(1234)  # a fresh process has some other global state
    resumed = list(train_batches(ds, cfg, epoch=1, steps=5, skip=3))
    assert len(resumed) == 2
    for a, b in zip(straight[3:], resumed):
        assert a["key"] == b["key"]
        assert torch.equal(a["global"], b["global"]) and torch.equal(a["local"], b["local"])
    other_epoch = next(iter(train_batches(ds, cfg, epoch=2, steps=1)))
    assert not torch.equal(other_epoch["global"], straight[0]["global"])


def test_http_url_stream_matches_file_stream(synthetic_dir):
    url, server = serve_folder(synthetic_dir)
    try:
        remote, local = load_dataset(url), load_dataset(synthetic_dir)
        assert remote.manifest == local.manifest
        get = lambda ds: [(k, int(y)) for b in make_loader(  # noqa: E731
            EvalStream(ds, "test", EvalTransform(32), 8), 0) for k, y in zip(b["key"], b["label"])]
        assert get(remote) == get(local) and len(get(local)) == 32
    finally:
        server.shutdown()


# ---------------------------------------------------------------------------------- bad input

def write_raw_shards(folder: Path, records: list[dict], classes=3, size=32, per_shard=None):
    folder.mkdir(parents=True, exist_ok=True)
    per_shard = per_shard or len(records)
    shards = []
    for start in range(0, len(records), per_shard):
        name = f"train-{len(shards):06d}.tar"
        with wds.TarWriter(str(folder / name)) as w:
            for r in records[start:start + per_shard]:
                w.write(r)
        shards.append({"file": name, "num_samples": len(records[start:start + per_shard]),
                       "sha256": sha256_file(folder / name)})
    manifest = {"format": "attmask-shards/1", "classes": [str(i) for i in range(classes)],
                "image_size": size, "splits": {"train": {"num_samples": len(records),
                                                         "shards": shards}}}
    (folder / MANIFEST).write_text(json.dumps(manifest))
    return load_dataset(folder)


def good(i, label=0, size=32):
    img = np.full((size, size, 3), i % 255, np.uint8)
    return {"__key__": f"s{i:05d}", "png": png_bytes(img), "cls": str(label).encode()}


def eval_all(ds, **kw):
    return [k for b in make_loader(EvalStream(ds, "train", EvalTransform(32), 8, **kw), 0)
            for k in b["key"]]


def test_missing_manifest_names_the_path(tmp_path):
    with pytest.raises(DataError, match=str(tmp_path / "nope" / MANIFEST)):
        load_dataset(tmp_path / "nope")


def test_missing_shard_and_checksum_mismatch_name_the_shard(tmp_path):
    ds = write_raw_shards(tmp_path / "d", [good(i) for i in range(10)], per_shard=5)
    ds.check_shards("train")
    shard = tmp_path / "d" / "train-000001.tar"
    data = bytearray(shard.read_bytes())
    data[600] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(DataError, match="train-000001.tar: sha256"):
        ds.check_shards("train")
    ds.check_shards("train", verify=False)
    shard.unlink()
    with pytest.raises(DataError, match="shard missing: .*train-000001.tar"):
        ds.check_shards("train")


def test_truncated_shard_is_named(tmp_path):
    ds = write_raw_shards(tmp_path / "d", [good(i) for i in range(10)])
    shard = tmp_path / "d" / "train-000000.tar"
    shard.write_bytes(shard.read_bytes()[:700] + b"garbage" * 100)
    with pytest.raises(DataError, match="train-000000.tar"):
        eval_all(ds)


def test_corrupt_samples_are_skipped_counted_and_bounded(tmp_path, caplog):
    records = [good(i) for i in range(200)]
    records[7]["png"] = b"not a png"
    records[50]["png"] = b"\x89PNG broken"
    ds = write_raw_shards(tmp_path / "d", records)
    keys = eval_all(ds, max_corrupt_fraction=0.05)
    assert len(keys) == 198 and "s00007" not in keys
    assert "s00007" in caplog.text and caplog.text.count("skipping corrupt") == 1
    stream = TrainStream(ds, "train", MultiCropTransform(32, 16, local_number=0), 50,
                         shuffle_buffer=1, max_corrupt_fraction=0.05)
    batches = [b for _, b in zip(range(12), make_loader(stream, 0))]  # three passes
    named = [key for b in batches for key in b["skipped"]]
    assert len(named) == 2 and {k.rsplit(":", 1)[1] for k in named} == {"s00007", "s00050"}
    with pytest.raises(DataError, match="2 of 1.. samples are corrupt"):
        eval_all(ds, max_corrupt_fraction=0.005)


def test_label_outside_classes_is_an_error(tmp_path):
    ds = write_raw_shards(tmp_path / "d", [good(0), good(1, label=7)], classes=3)
    with pytest.raises(DataError, match="label 7 outside the manifest's 3 classes"):
        eval_all(ds)


def test_image_smaller_than_global_crop_is_upsampled_and_counted(tmp_path):
    ds = write_raw_shards(tmp_path / "d", [good(0, size=16), good(1, size=32)], size=16)
    stream = TrainStream(ds, "train", MultiCropTransform(32, 16, local_number=0), 2,
                         min_size=32)
    batch = next(iter(make_loader(stream, 0)))
    assert batch["global"].shape == (2, 2, 3, 32, 32) and batch["small"] == 1


def test_empty_or_unknown_split_is_an_error(tmp_path):
    ds = write_raw_shards(tmp_path / "d", [good(0)])
    ds.manifest["splits"]["train"] = {"num_samples": 0, "shards": []}
    with pytest.raises(DataError, match="'train' .* is empty"):
        ds.shard_urls("train")
    with pytest.raises(DataError, match="split 'val' not in"):
        ds.shard_urls("val")


def test_s3_manifest_and_shards_go_through_the_aws_cli(synthetic_dir, tmp_path, monkeypatch):
    """s3:// data is read with `aws s3 cp URL -`; a stand-in `aws` serving the local files shows
    that the manifest and the streamed samples are the same as from the directory."""
    fake = tmp_path / "bin" / "aws"
    fake.parent.mkdir()
    fake.write_text(f'#!/bin/sh\n# aws s3 cp --quiet URL -\ncat "{synthetic_dir}/$(basename "$4")"\n')
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake.parent}:{os.environ['PATH']}")
    remote, local = load_dataset("s3://bucket/synthetic"), load_dataset(synthetic_dir)
    assert remote.manifest == local.manifest
    assert remote.shard_urls("test")[0] == "s3://bucket/synthetic/test-000000.tar"
    get = lambda ds: [k for b in make_loader(  # noqa: E731
        EvalStream(ds, "test", EvalTransform(32), 8), 0) for k in b["key"]]
    assert get(remote) == get(local)


def _blur_sigmas(compose) -> tuple[float, float]:
    (blur,) = [t.transforms[0] for t in compose.transforms
               if isinstance(t, v2.RandomApply) and isinstance(t.transforms[0], v2.GaussianBlur)]
    return tuple(blur.sigma)


def test_blur_sigma_is_the_official_range_or_scaled_with_the_crop():
    official = MultiCropTransform(224, 96, local_number=1, blur_sigma="official")
    scaled = MultiCropTransform(224, 96, local_number=1)
    assert _blur_sigmas(official.local) == _blur_sigmas(official.global1) == (0.1, 2.0)
    assert _blur_sigmas(scaled.global1) == (0.1, 2.0)  # 224 px: the two agree
    assert _blur_sigmas(scaled.local) == pytest.approx((0.1 * 96 / 224, 2.0 * 96 / 224))
    assert load_config("paper-20pct-in1k").data.blur_sigma == "official"
    assert load_config("tiny-cpu").data.blur_sigma == "scaled"


def test_colour_distortion_follows_the_config():
    # a solid dark colour: crops, flips, blur and solarisation (it inverts >= 128 only) keep it,
    # so any change of colour comes from the jitter or the grayscale
    image = torch.tensor([100, 40, 10], dtype=torch.uint8)[:, None, None].expand(3, 32, 32)
    def colours(cfg):
        torch.manual_seed(0)
        t = pretraining_transform(cfg)
        crops = [c for _ in range(20) for c in (t.global1(image), t.global2(image))]
        return torch.stack([c.mean((1, 2)) for c in crops])
    base = "model.image_size=32", "model.local_image_size=16", "model.patch_size=4"
    plain = colours(tiny_config(*base, "data.color_jitter_prob=0", "data.grayscale_prob=0"))
    assert torch.allclose(plain, plain[0].expand_as(plain), atol=1e-3)
    dino = colours(tiny_config(*base))  # DINO's distortion: most crops change colour
    assert (dino - plain).abs().amax(1).gt(0.05).float().mean() > 0.5
    grey = colours(tiny_config(*base, "data.color_jitter_prob=0", "data.grayscale_prob=1"))
    mean, std = torch.tensor(MEAN), torch.tensor(STD)
    rgb = grey * std + mean  # back to [0, 1]: every channel the same grey
    assert torch.allclose(rgb, rgb[:, :1].expand_as(rgb), atol=1e-3)
    jitter = pretraining_transform(tiny_config(*base, "data.color_jitter=[0.1,0.2,0.3,0.05]"))
    (jit,) = [t.transforms[0] for t in jitter.local.transforms
              if isinstance(t, v2.RandomApply) and isinstance(t.transforms[0], v2.ColorJitter)]
    assert jit.brightness == pytest.approx((0.9, 1.1)) and jit.hue == pytest.approx((-0.05, 0.05))
