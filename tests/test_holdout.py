"""The val split (attmask/data/holdout.py): held out of train while the shards are written,
class-stratified, never yielded by the training stream, identical across reruns."""
import hashlib
import itertools
import json
import subprocess
import sys
from collections import Counter

import numpy as np
import pytest

from attmask.data.holdout import Holdout
from attmask.data.prepare import PrepareArgs, prepare_data
from attmask.data.shards import MANIFEST, load_dataset
from attmask.data.stream import EvalStream, TrainStream, make_loader
from attmask.data.transforms import EvalTransform, MultiCropTransform
from conftest import ROOT


def keys_and_labels(ds, split):
    pairs = [(k, int(y)) for b in make_loader(EvalStream(ds, split, EvalTransform(32), 16), 0)
             for k, y in zip(b["key"], b["label"])]
    return dict(pairs)


def test_no_val_image_is_ever_yielded_by_the_training_stream(synthetic_dir):
    ds = load_dataset(synthetic_dir)
    val = keys_and_labels(ds, "val")
    train = keys_and_labels(ds, "train")
    assert val and not set(val) & set(train)
    assert len(val) + len(train) == 160  # nothing lost: the two splits are the generated train
    stream = TrainStream(ds, "train", MultiCropTransform(32, 16, local_number=0), 16,
                         shuffle_buffer=32)
    streamed = {k for b in itertools.islice(make_loader(stream, 2), 40) for k in b["key"]}
    assert len(streamed) == len(train) and not streamed & set(val)  # several passes, none val


def test_val_is_a_share_of_every_class_and_the_manifest_names_it(synthetic_dir):
    ds = load_dataset(synthetic_dir)
    val, train = keys_and_labels(ds, "val"), keys_and_labels(ds, "train")
    per_class = Counter(train.values()) + Counter(val.values())
    held = Counter(val.values())
    for label, n in per_class.items():  # systematic sampling: floor or ceil of 10 %
        assert int(n * 0.1) <= held[label] <= int(n * 0.1) + 1, (label, n, held[label])
    record = json.loads((synthetic_dir / MANIFEST).read_text())["val"]
    assert record["from"] == "train" and record["fraction"] == 0.1
    assert record["num_samples"] == len(val)
    assert record["keys_sha256"] == hashlib.sha256("\n".join(sorted(val)).encode()).hexdigest()


def test_the_split_is_identical_across_reruns_and_processes_and_moves_with_the_seed(tmp_path):
    args = dict(source="synthetic", num_samples=300, num_test_samples=10)
    prepare_data(PrepareArgs(out=str(tmp_path / "a"), **args))
    code = ("import sys; from attmask.data.prepare import PrepareArgs, prepare_data; "
            f"prepare_data(PrepareArgs(out=sys.argv[1], **{args!r}))")
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "b")], check=True, cwd=ROOT,
                   env={"PYTHONHASHSEED": "123", "PATH": ""})
    prepare_data(PrepareArgs(out=str(tmp_path / "c"), seed=0, val_fraction=0.1,
                             **{**args, "num_samples": 300}))
    a, b = (load_dataset(tmp_path / d) for d in "ab")
    assert keys_and_labels(a, "val") == keys_and_labels(b, "val")
    assert a.manifest["val"] == b.manifest["val"]
    assert keys_and_labels(load_dataset(tmp_path / "c"), "val") == keys_and_labels(a, "val")


def test_val_per_class_and_no_val(tmp_path):
    manifest, _ = prepare_data(PrepareArgs(source="synthetic", out=str(tmp_path / "pc"),
                                           num_samples=200, num_test_samples=4, val_per_class=3))
    val = keys_and_labels(load_dataset(tmp_path / "pc"), "val")
    assert set(Counter(val.values()).values()) == {3} and manifest["val"]["per_class"] == 3
    none, _ = prepare_data(PrepareArgs(source="synthetic", out=str(tmp_path / "none"),
                                       num_samples=40, num_test_samples=4, val_fraction=0))
    assert "val" not in none["splits"] and "val" not in none
    assert none["splits"]["train"]["num_samples"] == 40


@pytest.mark.parametrize("fraction", [0.05, 0.1, 0.25, 0.5])
def test_systematic_selection_holds_out_the_fraction_of_each_class(fraction):
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 7, 5000)
    h = Holdout(fraction=fraction, seed=3)
    held = Counter(int(y) for i, y in enumerate(labels) if h.take(str(i), int(y)))
    for label, n in Counter(labels.tolist()).items():
        assert abs(held[label] - n * fraction) <= 1
    again = Holdout(fraction=fraction, seed=4)
    assert [again.take(str(i), int(y)) for i, y in enumerate(labels)] != \
        [Holdout(fraction=fraction, seed=3).take(str(i), int(y)) for i, y in enumerate(labels)]
