import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file

from attmask.data.shards import load_dataset
from attmask.engine import NonFiniteLossError, StepMetrics
from attmask.errors import ConfigError, DataError
from attmask.models.vit import build_backbone
from attmask.monitor import OnlineKnn
from attmask.runtime import load_checkpoint
from attmask.train import KNN_METRICS, LOOP_METRICS, STUDENT_KNN_METRICS, keep_history_until, pretrain_local
from conftest import ROOT, tiny_config, tiny_yaml


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
    reported = set().union(*lines)  # what a search may name as its metric, exactly
    assert reported == set(LOOP_METRICS) | set(KNN_METRICS)
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


def test_student_knn_is_logged_beside_the_teacher_s(synthetic_dir, tmp_path):
    # a high LR and a slow teacher: after 3 steps the two networks score differently
    cfg = cfg_for(synthetic_dir, tmp_path, "train.epochs=1", "train.knn_student=true",
                  "optim.lr=0.2", "optim.momentum_teacher=0.9999")
    summary = pretrain_local(cfg, log=lambda s: None)
    lines = [json.loads(x) for x in (summary.run_dir / "metrics.jsonl").read_text().splitlines()]
    scored = [x for x in lines if "knn_top1" in x]
    assert [x["step"] for x in scored] == [0, 3]
    assert all(set(STUDENT_KNN_METRICS) <= set(x) for x in scored)
    # at step 0 the student is the teacher: the same weights score the same
    assert scored[0]["student_knn_top1"] == scored[0]["knn_top1"]
    # after training, the logged student score is the student's own (not the teacher's again)
    assert scored[1]["student_knn_top1"] != scored[1]["knn_top1"]
    final = load_checkpoint(summary.run_dir / "checkpoints" / "step_00000003.pt")
    monitor = OnlineKnn(load_dataset(cfg.data.path), cfg)
    for role, key in (("student", "student_knn_top1"), ("teacher", "knn_top1")):
        backbone = build_backbone(cfg.model).eval()
        backbone.load_state_dict({k.removeprefix("backbone."): v for k, v in final[role].items()
                                  if k.startswith("backbone.")})
        assert monitor(backbone)["knn_top1"] == pytest.approx(scored[1][key], abs=1e-6)


def test_same_run_name_resumes_from_latest_checkpoint(synthetic_dir, tmp_path):
    cfg = cfg_for(synthetic_dir, tmp_path, "train.run_name=resume-me",
                  "train.checkpoint_every_steps=2", "train.checkpoint_keep=5")
    first = pretrain_local(cfg, log=lambda s: None, max_steps=4)
    assert first.steps == 4
    messages = []
    second = pretrain_local(cfg, log=messages.append)
    assert second.resumed_from == 4 and second.steps == 6
    assert any("resuming resume-me from step 4" in m for m in messages)
    lines = [json.loads(x) for x in (second.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == list(range(0, 7))  # one history, no step repeated
    # The clock goes on from the checkpoint's training time, not from 0.
    clock = [x["train_s"] for x in lines]
    assert clock == sorted(clock) and clock[5] > clock[4] > 0
    assert load_checkpoint(second.run_dir / "checkpoints" / "step_00000004.pt")["train_s"] == clock[4]
    with pytest.raises(ConfigError, match="different config"):
        pretrain_local(cfg_for(synthetic_dir, tmp_path, "train.run_name=resume-me",
                               "train.checkpoint_every_steps=2", "train.checkpoint_keep=5",
                               "optim.lr=0.1"), log=lambda s: None)


def test_nan_loss_stops_with_step_and_keeps_last_good_checkpoint(synthetic_dir, tmp_path):
    cfg = cfg_for(synthetic_dir, tmp_path, "train.run_name=nan", "train.checkpoint_every_steps=1")

    def diverge_at_step_5(engine):  # weights gone non-finite, as after a divergence
        if engine.step == 4:
            with torch.no_grad():
                next(engine.student.parameters()).fill_(float("inf"))

    with pytest.raises(NonFiniteLossError, match="step 5"):
        pretrain_local(cfg, log=lambda s: None, before_step=diverge_at_step_5)
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


RESUME = ["train.steps_per_epoch=5", "train.checkpoint_every_steps=2", "train.checkpoint_keep=20",
          "model.drop_path=0.1", "masking.strategy=attmask_hint"]


def step_values(run_dir):
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {x["step"]: (x.get("loss"), x.get("masked_fraction"), x.get("knn_top1")) for x in lines}


def start_cli(config, *extra):
    return subprocess.Popen([sys.executable, "run_pipeline.py", "pretrain-local", "--config",
                             str(config), *extra], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


def wait_for(path, proc, timeout=120):
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
        time.sleep(0.01)


def test_killed_run_resumes_exactly_where_it_stopped(synthetic_dir, tmp_path):
    """SIGKILL mid-epoch, rerun: every later step and the final weights match a straight run."""
    straight = pretrain_local(cfg_for(synthetic_dir, tmp_path, "train.run_name=straight", *RESUME),
                              log=lambda s: None)
    config = tiny_yaml(tmp_path / "run.yaml", f"data.path={synthetic_dir}",
                       f"train.output_dir={tmp_path}", "train.run_name=killed",
                       "data.local_crops_number=1", *RESUME)
    proc = start_cli(config)
    wait_for(tmp_path / "killed" / "checkpoints" / "step_00000002.pt", proc)
    proc.kill()
    assert proc.wait() == -signal.SIGKILL
    (tmp_path / "killed" / "checkpoints" / "step_00000004.pt.tmp").write_bytes(b"torn")
    resumed = pretrain_local(cfg_for(synthetic_dir, tmp_path, "train.run_name=killed", *RESUME),
                             log=lambda s: None)
    assert resumed.resumed_from is not None and 0 < resumed.resumed_from < 10
    assert not list((tmp_path / "killed" / "checkpoints").glob("*.tmp"))
    assert step_values(resumed.run_dir) == step_values(straight.run_dir)  # steps 0..10, exactly
    a = load_file(straight.run_dir / "teacher_backbone.safetensors")
    b = load_file(resumed.run_dir / "teacher_backbone.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_unreadable_latest_checkpoint_is_named_and_an_older_one_used(synthetic_dir, tmp_path):
    cfg = cfg_for(synthetic_dir, tmp_path, "train.run_name=torn", *RESUME)
    pretrain_local(cfg, log=lambda s: None, max_steps=4)
    ckpts = tmp_path / "torn" / "checkpoints"
    latest = ckpts / "step_00000004.pt"
    latest.write_bytes(latest.read_bytes()[:1000])  # truncated, e.g. a disk that filled up
    messages = []
    summary = pretrain_local(cfg, log=messages.append)
    assert summary.resumed_from == 2 and summary.steps == 10
    assert any(f"skipping unreadable checkpoint {latest}" in m for m in messages)


def test_interrupt_prints_one_line_saying_where_it_resumes(synthetic_dir, tmp_path):
    config = tiny_yaml(tmp_path / "run.yaml", f"data.path={synthetic_dir}",
                       f"train.output_dir={tmp_path}", "train.run_name=stopped",
                       "data.local_crops_number=1", "train.epochs=200", *RESUME)
    proc = start_cli(config)
    wait_for(tmp_path / "stopped" / "checkpoints" / "step_00000002.pt", proc)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130
    lines = [x for x in err.splitlines() if x.strip()]
    assert "Traceback" not in err and len(lines) == 1, err
    assert lines[0].startswith("interrupted at step ") and "resumes" in lines[0]
    assert str(tmp_path / "stopped") in lines[0]


def test_resume_drops_history_past_the_checkpoint_and_torn_lines(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in range(7))
                    + '{"step": 7, "lo')
    keep_history_until(path, 4)
    assert [json.loads(x)["step"] for x in path.read_text().splitlines()] == [0, 1, 2, 3, 4]


def test_a_run_with_batched_colour_resumes_exactly(synthetic_dir, tmp_path):
    """data.colour_on=batch: the colour step runs in the training loop, and a resumed run
    still draws exactly what a straight one draws."""
    extra = ("data.colour_on=batch", "train.epochs=1", "train.checkpoint_every_steps=1")
    straight = pretrain_local(cfg_for(synthetic_dir, tmp_path, "train.run_name=straight", *extra),
                              log=lambda s: None)
    cfg = cfg_for(synthetic_dir, tmp_path, "train.run_name=cut", *extra)
    pretrain_local(cfg, log=lambda s: None, max_steps=2)
    resumed = pretrain_local(cfg, log=lambda s: None)
    assert resumed.resumed_from == 2 and step_values(resumed.run_dir) == step_values(
        straight.run_dir)
    a = load_file(straight.run_dir / "teacher_backbone.safetensors")
    b = load_file(resumed.run_dir / "teacher_backbone.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    image = pretrain_local(cfg_for(synthetic_dir, tmp_path, "train.run_name=image",
                                   "train.epochs=1"), log=lambda s: None)
    c = load_file(image.run_dir / "teacher_backbone.safetensors")
    assert not all(torch.equal(a[k], c[k]) for k in a)  # the colour path did change the crops


def children_of(pid: int) -> set[int]:
    """Every live descendant of ``pid`` (from /proc); called while the trainer runs, since
    once it dies its children are re-parented and no longer found this way."""
    found, parents = set(), {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
                parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
    frontier = {pid}
    while frontier:
        frontier = {c for c, p in parents.items() if p in frontier} - found
        found |= frontier
    return found


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has exited


def test_a_killed_trainer_leaves_no_data_loader_worker_running(synthetic_dir, tmp_path):
    config = tiny_yaml(tmp_path / "run.yaml", f"data.path={synthetic_dir}",
                       f"train.output_dir={tmp_path}", "train.run_name=loaders",
                       "data.local_crops_number=1", "data.num_workers=2",
                       "train.steps_per_epoch=50", "train.checkpoint_every_steps=1",
                       "train.knn_every_epochs=0")
    proc = start_cli(config)
    wait_for(tmp_path / "loaders" / "checkpoints" / "step_00000001.pt", proc)
    workers = children_of(proc.pid)
    assert len(workers) >= 2  # the loader's worker processes
    proc.kill()
    assert proc.wait() == -signal.SIGKILL
    deadline = time.monotonic() + 30  # a worker notices its parent is gone within seconds
    while any(alive(w) for w in workers) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not [w for w in workers if alive(w)], "data-loader workers outlived the trainer"
