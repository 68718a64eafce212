"""The pretraining loop, shared by ``pretrain-local`` (one process) and the Ray pipeline (every
worker): epochs over the shard stream, console progress, the online k-NN monitor, checkpoints
and resume. Where checkpoints and metrics go is decided by the caller's :class:`Hooks`.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Optional

import torch

from attmask.config import Config
from attmask.data.shards import Dataset, load_dataset
from attmask.data.stream import steps_per_epoch, train_batches
from attmask.data.transforms import pretraining_transform
from attmask.engine import Engine, check_finite
from attmask.errors import (
    CheckpointError,
    ConfigError,
    DataError,
    Interrupted,
    check_output_dir,
)
from attmask.models.export import save_backbone
from attmask.monitor import OnlineKnn
from attmask.runtime import load_checkpoint

CHECKPOINT_GLOB = "step_*.pt"
# What every logged step reports (a search's metric must be one of these); the online monitor
# adds knn_top1 and knn_top5 when it runs, and patch_loss exists with the iBOT loss only.
LOOP_METRICS = ("loss", "cls_loss", "patch_loss", "teacher_flatness", "masked_fraction", "lr",
                "weight_decay", "teacher_momentum", "teacher_temp", "images_per_s", "train_s",
                "small_images", "step", "epoch")
KNN_METRICS = ("knn_top1", "knn_top5")
# With train.knn_student the monitor also scores the student, to tell the teacher's EMA lag
# from what the student itself has learned.
STUDENT_KNN_METRICS = ("student_knn_top1", "student_knn_top5")


@dataclass
class Hooks:
    """Where the loop's outputs go.

    ``checkpoint(engine, metrics)`` persists the full state (called at the end of every epoch,
    every ``train.checkpoint_every_steps`` and when the loop stops); ``log(metrics)`` receives
    the metrics of every logged step. Metrics logged since the last checkpoint are replayed
    after a crash, so sinks that must not repeat a step buffer them until the next checkpoint.
    ``before_step(engine)`` and ``after_step(engine)`` (after the step's logs and checkpoint)
    are for instrumentation, e.g. the pipelines' fault injection.
    """

    checkpoint: Callable[[Engine, dict], None]
    log: Callable[[dict], None] = lambda metrics: None
    before_step: Callable[[Engine], None] = lambda engine: None
    after_step: Callable[[Engine], None] = lambda engine: None


@dataclass
class LoopResult:
    steps: int
    images_per_s: float
    final_metrics: dict
    skipped_samples: int


def open_dataset(cfg: Config) -> Dataset:
    """Load and check the training data before any work starts."""
    if not cfg.data.path:
        raise ConfigError("data.path is not set: point it at a prepare-data output directory, "
                          "e.g. data.path=data/synthetic-fixed-32")
    dataset = load_dataset(cfg.data.path)
    dataset.check_shards(cfg.data.split, verify=cfg.data.verify_checksums)
    if dataset.image_size < cfg.model.image_size:
        raise DataError(f"{cfg.data.path}: images are {dataset.image_size} px, smaller than the "
                        f"global crop model.image_size={cfg.model.image_size}")
    return dataset


def run_loop(engine: Engine, dataset: Dataset, cfg: Config, hooks: Hooks, *, rank: int = 0,
             world_size: int = 1, max_steps: Optional[int] = None,
             print_fn: Callable[[str], None] = print) -> LoopResult:
    """Train from ``engine.step`` to the end (or ``max_steps``), resuming mid-epoch if needed."""
    steps = engine.steps_per_epoch
    last = min(max_steps or engine.total_steps, engine.total_steps)
    monitor = OnlineKnn(dataset, cfg) if rank == 0 else None
    crops = pretraining_transform(cfg)  # finishes each batch (data.colour_on=batch: its colour)
    global_batch = cfg.train.batch_size_per_worker * world_size
    skipped: set[str] = set()  # distinct corrupt samples (each epoch reads them again)
    floats, knn = {}, {}
    small = 0  # images smaller than the global crop, upsampled (counted per read)
    def measure() -> dict:
        assert monitor is not None  # measured on rank 0 only
        scores = monitor(engine.teacher.backbone, engine.device)
        if cfg.train.knn_student:
            scores.update(monitor(engine.student.backbone, engine.device, prefix="student_"))
        return scores

    if monitor is not None and monitor.available and engine.step == 0:
        # The untrained network's score is the baseline every later point is read against.
        init = measure()
        print_fn(f"init: online k-NN top-1 {init['knn_top1']:.3f}")
        hooks.log({"step": 0, "epoch": 0, "train_s": 0.0, **init})
    start, start_step, start_train_s = time.perf_counter(), engine.step, engine.train_s
    monitor_s = 0.0  # time spent measuring, not training: kept out of train_s
    checkpointed = engine.step
    while engine.step < last:
        epoch = engine.epoch
        for batch in train_batches(dataset, cfg, epoch=epoch, steps=steps, rank=rank,
                                   world_size=world_size, skip=engine.step % steps):
            hooks.before_step(engine)
            metrics = engine.train_step(*crops.finish(batch, engine.device))
            skipped.update(batch["skipped"])
            small += batch["small"]
            end_of_epoch = engine.step % steps == 0
            every = cfg.train.checkpoint_every_steps
            checkpoint_now = end_of_epoch or bool(every and engine.step % every == 0)
            if end_of_epoch and monitor is not None and monitor.due(epoch):
                tick = time.perf_counter()
                knn = measure()
                monitor_s += time.perf_counter() - tick
                student = (f" (student {knn['student_knn_top1']:.3f})"
                           if "student_knn_top1" in knn else "")
                print_fn(f"epoch {epoch + 1}: online k-NN top-1 {knn['knn_top1']:.3f}{student}")
            if engine.step % cfg.train.log_every_steps == 0 or checkpoint_now:
                floats = metrics.as_floats()
                check_finite(floats, engine.step)
                elapsed = time.perf_counter() - start - monitor_s  # this session
                engine.train_s = start_train_s + elapsed
                rate = (engine.step - start_step) * global_batch / max(elapsed, 1e-9)
                eta = (last - engine.step) * global_batch / max(rate, 1e-9)
                floats.update(images_per_s=rate, step=engine.step, epoch=epoch + 1,
                              train_s=engine.train_s, small_images=small, **knn)
                knn = {}  # logged at the step it was measured, not repeated after it
                hooks.log(floats)
                if rank == 0:
                    print_fn(f"epoch {epoch + 1}/{cfg.train.epochs} step {engine.step}/"
                             f"{engine.total_steps} loss {floats['loss']:.4f} masked "
                             f"{floats['masked_fraction']:.3f} teacher flatness "
                             f"{floats['teacher_flatness']:.2f} lr {floats['lr']:.2e} "
                             f"{rate:.1f} img/s ETA {eta:.0f}s")
            if checkpoint_now:
                hooks.checkpoint(engine, dict(floats, end_of_epoch=end_of_epoch))
                checkpointed = engine.step
            hooks.after_step(engine)
            if engine.step >= last:
                break
    if checkpointed != engine.step:  # stopped early (max_steps): keep what was done
        hooks.checkpoint(engine, dict(floats, end_of_epoch=False))
    elapsed = time.perf_counter() - start
    return LoopResult(engine.step, (engine.step - start_step) * global_batch / max(elapsed, 1e-9),
                      floats, len(skipped))


# ----------------------------------------------------------------------------------------------
# Single process


@dataclass
class RunSummary:
    run_dir: Path
    steps: int
    resumed_from: Optional[int]
    final_metrics: dict[str, float]
    images_per_s: float
    skipped_samples: int


def default_run_name(cfg: Config) -> str:
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S-%f")
    return f"{cfg.masking.strategy}-{stamp}"


def latest_intact_checkpoint(directory: Path, device: torch.device,
                             log: Callable[[str], None] = print) -> Optional[dict]:
    """The newest checkpoint of ``directory`` that loads; unreadable ones (a torn copy, a full
    disk) are named and passed over, and ``.tmp`` leftovers of a write that was killed removed."""
    for leftover in directory.glob(CHECKPOINT_GLOB + ".tmp"):
        leftover.unlink()
    for path in sorted(directory.glob(CHECKPOINT_GLOB), reverse=True):
        try:
            return load_checkpoint(path, device)
        except Exception as exc:  # noqa: BLE001 - any unreadable file: fall back to an older one
            log(f"skipping unreadable checkpoint {path} ({exc.__class__.__name__}: "
                f"{str(exc).splitlines()[0][:160] if str(exc) else 'no detail'})")
    return None


def keep_history_until(path: Path, step: int) -> None:
    """Drop the metric lines after ``step`` (the checkpoint a run resumes from) and a torn last
    line, so the resumed run's replay leaves one entry per step."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue  # a line cut short by the kill
        if entry.get("step", 0) <= step:
            kept.append(line + "\n")
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(kept))
    tmp.replace(path)


def latest_step(directory: Path) -> Optional[int]:
    found = sorted(directory.glob(CHECKPOINT_GLOB))
    return int(found[-1].stem.removeprefix("step_")) if found else None


def export_teacher(engine: Engine, path: Path) -> Path:
    """Teacher backbone as safetensors with timm's key names and its architecture in the
    metadata (:func:`attmask.load_backbone` and ``timm.create_model`` load it)."""
    return save_backbone(engine.teacher.backbone, engine.cfg, path)


def pretrain_local(cfg: Config, *, device: Optional[torch.device] = None,
                   log: Callable[[str], None] = print, max_steps: Optional[int] = None,
                   before_step: Callable[[Engine], None] = lambda engine: None,
                   after_step: Callable[[Engine], None] = lambda engine: None) -> RunSummary:
    """Train ``cfg`` in this process; resumes when ``train.run_name`` has checkpoints already.
    ``before_step`` / ``after_step`` are the loop's instrumentation hooks (see :class:`Hooks`)."""
    check_output_dir(cfg.train.output_dir, "train.output_dir")
    dataset = open_dataset(cfg)
    engine = Engine(cfg, steps_per_epoch(dataset, cfg), device=device)
    run_dir = Path(cfg.train.output_dir) / (cfg.train.run_name or default_run_name(cfg))
    ckpt_dir = run_dir / "checkpoints"
    resumed_from = None
    if (state := latest_intact_checkpoint(ckpt_dir, engine.device, log)) is not None:
        if state["config"] != cfg.to_yaml():
            raise ConfigError(f"run {run_dir} was started with a different config; use a new "
                              "train.run_name or the original settings")
        engine.load_state_dict(state)
        resumed_from = engine.step
        log(f"resuming {run_dir.name} from step {engine.step} (epoch {engine.epoch})")
    run_dir.mkdir(parents=True, exist_ok=True)
    keep_history_until(run_dir / "metrics.jsonl", resumed_from or 0)
    (run_dir / "config.yaml").write_text(cfg.to_yaml())
    log(f"run {run_dir} | {cfg.masking.strategy} | {engine.total_steps} steps "
        f"({cfg.train.epochs} epochs x {engine.steps_per_epoch}) | device {engine.device} "
        f"{engine.precision}")

    pending: list[dict] = []  # metrics become durable with the checkpoint of their step

    def checkpoint(engine: Engine, metrics: dict) -> None:
        # History first, then the checkpoint: a kill in between leaves steps past the last
        # checkpoint in the file, which the resume drops (keep_history_until) and replays.
        with open(run_dir / "metrics.jsonl", "a") as f:
            f.writelines(json.dumps(m) + "\n" for m in pending)
        pending.clear()
        try:
            engine.save(ckpt_dir / f"step_{engine.step:08d}.pt")
        except CheckpointError as exc:
            last = latest_step(ckpt_dir)
            raise CheckpointError(
                f"{exc}; " + (f"the last complete checkpoint (step {last}) is intact: free "
                              "space and rerun the same command to resume from it"
                              if last is not None else "no checkpoint was written yet")) from exc
        for old in sorted(ckpt_dir.glob(CHECKPOINT_GLOB))[:-cfg.train.checkpoint_keep]:
            old.unlink()

    try:
        result = run_loop(engine, dataset, cfg,
                          Hooks(checkpoint, pending.append, before_step, after_step),
                          max_steps=max_steps, print_fn=log)
    except KeyboardInterrupt:
        last = latest_step(ckpt_dir)
        raise Interrupted(f"interrupted at step {engine.step}; the same command resumes {run_dir}"
                          f" from step {last} (its last checkpoint)" if last is not None else
                          f"interrupted at step {engine.step} before the first checkpoint; the "
                          "same command starts the run again") from None
    if result.skipped_samples:
        log(f"skipped {result.skipped_samples} corrupt samples")
    export_teacher(engine, run_dir / "teacher_backbone.safetensors")
    return RunSummary(run_dir, result.steps, resumed_from, result.final_metrics,
                      result.images_per_s, result.skipped_samples)
