import json

import pytest
import timm
import torch
from safetensors.torch import load_file

from attmask.engine import NonFiniteLossError, StepMetrics, load_checkpoint
from attmask.errors import ConfigError, DataError
from attmask.train import pretrain_local
from conftest import tiny_config


def cfg_for(data, tmp_path, *extra):
    return tiny_config(f"data.path={data}", f"train.output_dir={tmp_path}",
                       "train.steps_per_epoch=3", "data.local_crops_number=1", *extra)


def test_pretrain_local_writes_outputs_and_timm_loadable_teacher(synthetic_dir, tmp_path):
    summary = pretrain_local(cfg_for(synthetic_dir, tmp_path), log=lambda s: None)
    assert summary.steps == 6 and summary.resumed_from is None
    run = summary.run_dir
    assert (run / "config.yaml").is_file()
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == list(range(0, 7))
    # the untrained network's k-NN at step 0, then at each epoch end, never repeated in between
    assert [x["step"] for x in lines if "knn_top1" in x] == [0, 3, 6]
    assert lines[0]["train_s"] == 0.0 and lines[-1]["train_s"] > 0
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [
        "step_00000003.pt", "step_00000006.pt"]
    weights = load_file(run / "teacher_backbone.safetensors")
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=4,
                              depth=2, num_classes=0)
    model.load_state_dict(weights, strict=True)
    teacher = load_checkpoint(run / "checkpoints" / "step_00000006.pt")["teacher"]
    assert torch.equal(weights["blocks.0.attn.qkv.weight"],
                       teacher["backbone.blocks.0.attn.qkv.weight"])


def test_same_run_name_resumes_from_latest_checkpoint(synthetic_dir, tmp_path):
    cfg = cfg_for(synthetic_dir, tmp_path, "train.run_name=resume-me",
                  "train.checkpoint_every_steps=2", "train.checkpoint_keep=5")
    first = pretrain_local(cfg, log=lambda s: None, max_steps=4)
    assert first.steps == 4
    messages = []
    second = pretrain_local(cfg, log=messages.append)
    assert second.resumed_from == 4 and second.steps == 6
    assert any("resuming resume-me from step 4" in m for m in messages)
    steps = [json.loads(x)["step"] for x in (second.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(0, 7))  # one continuous history, no step repeated
    with pytest.raises(ConfigError, match="different config"):
        pretrain_local(cfg_for(synthetic_dir, tmp_path, "train.run_name=resume-me",
                               "train.checkpoint_every_steps=2", "train.checkpoint_keep=5",
                               "optim.lr=0.1"), log=lambda s: None)


def test_nan_loss_stops_with_step_and_keeps_last_good_checkpoint(synthetic_dir, tmp_path):
    cfg = cfg_for(synthetic_dir, tmp_path, "train.run_name=nan", "train.checkpoint_every_steps=1",
                  "train.inject_fault_at_step=5", "train.inject_fault_kind=nan")
    with pytest.raises(NonFiniteLossError, match="step 5"):
        pretrain_local(cfg, log=lambda s: None)
    kept = sorted(p.name for p in (tmp_path / "nan" / "checkpoints").iterdir())
    assert kept == ["step_00000003.pt", "step_00000004.pt"]
    assert load_checkpoint(tmp_path / "nan" / "checkpoints" / kept[-1])["step"] == 4


def test_data_problems_are_found_before_training(synthetic_dir, tmp_path):
    with pytest.raises(ConfigError, match="data.path is not set"):
        pretrain_local(tiny_config(), log=lambda s: None)
    with pytest.raises(DataError, match="smaller than the global crop"):
        pretrain_local(cfg_for(synthetic_dir, tmp_path, "model.image_size=64"),
                       log=lambda s: None)
    with pytest.raises(ConfigError, match="steps_per_epoch"):
        pretrain_local(tiny_config(f"data.path={synthetic_dir}",
                                   "train.batch_size_per_worker=1000"), log=lambda s: None)


def test_step_metrics_convert_lazily():
    m = StepMetrics({"loss": torch.tensor(2.0)}, {"lr": 0.1})
    assert m.as_floats() == {"loss": 2.0, "lr": 0.1}
