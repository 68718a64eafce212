"""Single-process pretraining loop (``run_pipeline.py pretrain-local``), also the body that the
Ray pipeline runs on every worker: epochs over the shard stream, progress, checkpoints, resume.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Optional

import torch

from attmask.config import Config
from attmask.data.shards import Dataset, load_dataset
from attmask.data.stream import steps_per_epoch, train_batches
from attmask.engine import Engine, check_finite, load_checkpoint
from attmask.errors import ConfigError, DataError

CHECKPOINT_GLOB = "step_*.pt"


@dataclass
class RunSummary:
    run_dir: Path
    steps: int
    epochs: int
    resumed_from: Optional[int]
    final_metrics: dict[str, float]
    images_per_s: float
    skipped_samples: int
    history: list[dict] = field(default_factory=list)


def open_dataset(cfg: Config) -> Dataset:
    """Load and check the training data before any work starts."""
    if not cfg.data.path:
        raise ConfigError("data.path is not set: point it at a prepare-data output directory, "
                          "e.g. data.path=data/synthetic-32")
    dataset = load_dataset(cfg.data.path)
    dataset.check_shards(cfg.data.split, verify=cfg.data.verify_checksums)
    if dataset.image_size < cfg.model.image_size:
        raise DataError(f"{cfg.data.path}: images are {dataset.image_size} px, smaller than the "
                        f"global crop model.image_size={cfg.model.image_size}")
    return dataset


def default_run_name(cfg: Config) -> str:
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S-%f")
    return f"{cfg.masking.strategy}-{stamp}"


def latest_checkpoint(directory: Path) -> Optional[Path]:
    found = sorted(directory.glob(CHECKPOINT_GLOB))
    return found[-1] if found else None


def prune_checkpoints(directory: Path, keep: int) -> None:
    for old in sorted(directory.glob(CHECKPOINT_GLOB))[:-keep]:
        old.unlink()


def export_teacher(engine: Engine, path: Path) -> Path:
    """Teacher backbone as safetensors with timm's key names (``timm.create_model`` loads it)."""
    from safetensors.torch import save_file

    state = {k: v.detach().cpu().contiguous()
             for k, v in engine.teacher.backbone.backbone_state_dict().items()}
    save_file(state, str(path))
    return path


def pretrain_local(cfg: Config, *, device: Optional[torch.device] = None,
                   log: Callable[[str], None] = print,
                   max_steps: Optional[int] = None) -> RunSummary:
    """Train ``cfg`` in this process; resumes when ``train.run_name`` has checkpoints already."""
    dataset = open_dataset(cfg)
    steps = steps_per_epoch(dataset, cfg)
    engine = Engine(cfg, steps, device=device)
    run_dir = Path(cfg.train.output_dir) / (cfg.train.run_name or default_run_name(cfg))
    ckpt_dir = run_dir / "checkpoints"
    resumed_from = None
    if (latest := latest_checkpoint(ckpt_dir)) is not None:
        state = load_checkpoint(latest, engine.device)
        if state["config"] != cfg.to_yaml():
            raise ConfigError(f"run {run_dir} was started with a different config; use a new "
                              "train.run_name or the original settings")
        engine.load_state_dict(state)
        resumed_from = engine.step
        log(f"resuming {run_dir.name} from step {engine.step} (epoch {engine.epoch})")
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(cfg.to_yaml())
    log(f"run {run_dir} | {cfg.masking.strategy} | {engine.total_steps} steps "
        f"({cfg.train.epochs} epochs x {steps}) | device {engine.device} {engine.precision}")

    last = max_steps if max_steps is not None else engine.total_steps
    history, skipped, floats = [], 0, {}
    batch_images = cfg.train.batch_size_per_worker
    start, start_step = time.perf_counter(), engine.step
    with open(run_dir / "metrics.jsonl", "a") as metrics_file:
        while engine.step < min(last, engine.total_steps):
            epoch = engine.epoch
            for batch in train_batches(dataset, cfg, epoch=epoch, steps=steps,
                                       skip=engine.step % steps):
                metrics = engine.train_step(batch["global"], batch["local"])
                skipped += batch["skipped"]
                end_of_epoch = engine.step % steps == 0
                if engine.step % cfg.train.log_every_steps == 0 or end_of_epoch:
                    floats = metrics.as_floats()
                    check_finite(floats, engine.step)
                    elapsed = time.perf_counter() - start
                    rate = (engine.step - start_step) * batch_images / max(elapsed, 1e-9)
                    eta = (min(last, engine.total_steps) - engine.step) * batch_images / max(rate, 1e-9)
                    floats.update(images_per_s=rate, step=engine.step, epoch=epoch)
                    history.append(floats)
                    metrics_file.write(json.dumps(floats) + "\n")
                    log(f"epoch {epoch + 1}/{cfg.train.epochs} step {engine.step}/"
                        f"{engine.total_steps} loss {floats['loss']:.4f} "
                        f"masked {floats['masked_fraction']:.3f} lr {floats['lr']:.2e} "
                        f"{rate:.1f} img/s ETA {eta:.0f}s")
                every = cfg.train.checkpoint_every_steps
                if end_of_epoch or (every and engine.step % every == 0):
                    check_finite(metrics.as_floats(), engine.step)
                    engine.save(ckpt_dir / f"step_{engine.step:08d}.pt")
                    prune_checkpoints(ckpt_dir, cfg.train.checkpoint_keep)
                if engine.step >= last:
                    break
    if skipped:
        log(f"skipped {skipped} corrupt samples")
    export_teacher(engine, run_dir / "teacher_backbone.safetensors")
    elapsed = time.perf_counter() - start
    return RunSummary(run_dir, engine.step, cfg.train.epochs, resumed_from, floats,
                      (engine.step - start_step) * batch_images / max(elapsed, 1e-9), skipped,
                      history)
