"""A full disk (a write hook raising ENOSPC) during prepare-data or training: one line that
names the path and what survived, and the data and the last good checkpoint do survive."""
import errno
import os

import pytest
import webdataset as wds

from attmask.data.prepare import PrepareArgs, prepare_data
from attmask.data.shards import load_dataset
from attmask.engine import Engine
from attmask.errors import CheckpointError, DataError
from attmask.train import latest_step, pretrain_local
from conftest import tiny_config


def full_after(n: int):
    """A write that fails with ENOSPC from its n-th call on."""
    calls = {"n": 0}

    def hook(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] >= n:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "shard.tar")
        return original(*args, **kwargs)

    original = wds.TarWriter.write
    return hook


def test_prepare_data_on_a_full_disk_keeps_the_old_dataset(tmp_path, monkeypatch):
    out = tmp_path / "data"
    prepare_data(PrepareArgs(source="synthetic", out=str(out), num_samples=40,
                             num_test_samples=8))
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    monkeypatch.setattr(wds.TarWriter, "write", full_after(10))
    with pytest.raises(DataError, match=rf"--out {out}: cannot write .*No space left on device.*"
                                        rf"dataset that was in {out} is unchanged"):
        prepare_data(PrepareArgs(source="synthetic", out=str(out), num_samples=60,
                                 num_test_samples=8))
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert not list(tmp_path.glob(".data.partial-*"))
    load_dataset(out).check_shards("train")


def test_an_interrupted_prepare_leaves_no_staging_folder_after_the_next_run(tmp_path):
    out = tmp_path / "data"
    stale = tmp_path / ".data.partial-999999999"  # a killed run's: its pid is gone
    (stale / "sub").mkdir(parents=True)
    (stale / "train-000000.tar").write_bytes(b"half")
    prepare_data(PrepareArgs(source="synthetic", out=str(out), num_samples=20,
                             num_test_samples=4))
    assert not stale.exists() and not list(tmp_path.glob(".data.partial-*"))


def test_training_on_a_full_disk_names_the_checkpoint_and_keeps_the_last_good_one(
        synthetic_dir, tmp_path, monkeypatch):
    cfg = tiny_config(f"data.path={synthetic_dir}", f"train.output_dir={tmp_path}",
                      "train.steps_per_epoch=2", "train.epochs=3", "train.knn_every_epochs=0",
                      "train.run_name=full")
    import torch

    original, real_save, saves = Engine.save, torch.save, {"n": 0}

    def full(*args, **kwargs):  # what torch.save raises on a full disk
        raise RuntimeError("[enforce fail at inline_container.cc:664] . PytorchStreamWriter "
                           "failed writing file data/12: file write failed")

    def save(self, path, extra=None):
        saves["n"] += 1
        torch.save = full if saves["n"] == 2 else real_save  # the second checkpoint: disk full
        try:
            return original(self, path, extra)
        finally:
            torch.save = real_save

    monkeypatch.setattr(Engine, "save", save)
    with pytest.raises(CheckpointError, match=r"cannot write checkpoint .*step_00000004\.pt "
                                              r".*file write failed.*last complete checkpoint "
                                              r"\(step 2\) is intact"):
        pretrain_local(cfg, log=lambda s: None)
    ckpts = tmp_path / "full" / "checkpoints"
    assert latest_step(ckpts) == 2 and not list(ckpts.glob("*.tmp"))
    monkeypatch.setattr(Engine, "save", original)
    summary = pretrain_local(cfg, log=lambda s: None)  # space again: it resumes from step 2
    assert summary.resumed_from == 2 and summary.steps == 6 and latest_step(ckpts) == 6
