"""The training engine: models, optimiser, precomputed schedules and one readable training step.

The step follows the paper's order: teacher forward (with [CLS] attention) -> masks -> student
forward -> loss -> backward -> per-tensor clipping -> AdamW -> EMA teacher. No host syncs on the
hot path except the boolean gather of masked tokens; metrics stay tensors until logged.
"""
from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, cast

import numpy as np
import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from attmask.config import Config, ModelConfig
from attmask.errors import CheckpointError, ConfigError, UserError
from attmask.loss import IBOTLoss
from attmask.masking import make_masker
from attmask.models import IBOTHead, MultiCropNet, build_backbone
from attmask.runtime import (
    cosine_schedule,
    load_checkpoint,
    resolve_device,
    resolve_precision,
    step_seed,
    teacher_temperature,
)

log = logging.getLogger(__name__)


class NonFiniteLossError(UserError):
    """The loss became NaN or infinite; training stops, the last checkpoint is left intact. The
    cure is in the config (learning rate, precision), so the CLI reports it as one line."""


@dataclass
class StepMetrics:
    """Tensors of one step; call :meth:`as_floats` only when logging (it syncs)."""

    values: dict[str, torch.Tensor]
    scalars: dict[str, float]

    def as_floats(self) -> dict[str, float]:
        return {**{k: float(v) for k, v in self.values.items()}, **self.scalars}


def build_net(m: ModelConfig, drop_path: Optional[float] = None) -> MultiCropNet:
    """Backbone plus projection head, freshly initialised from the global torch RNG."""
    backbone = build_backbone(m, drop_path=drop_path)
    head = IBOTHead(backbone.embed_dim, m.out_dim, hidden_dim=m.head_hidden_dim,
                    bottleneck_dim=m.head_bottleneck_dim, num_layers=m.head_layers,
                    norm_last_layer=m.norm_last_layer, shared_head=m.shared_head,
                    patch_out_dim=m.patch_out_dim, batch_norm=m.head_bn)
    return MultiCropNet(backbone, head)


def initial_networks(cfg: Config) -> tuple[MultiCropNet, MultiCropNet]:
    """Student and teacher at step 0: a function of ``cfg.model`` and ``cfg.train.seed`` only,
    so every masking strategy of one seed starts from bit-identical weights (the teacher is the
    student's copy, as in DINO) and the "init" baseline is exactly what training starts from."""
    torch.manual_seed(cfg.train.seed)
    student = build_net(cfg.model)
    teacher = build_net(cfg.model, drop_path=0.0)
    teacher.load_state_dict(student.state_dict())
    teacher.requires_grad_(False)
    return student, teacher


class Engine:
    """Student, EMA teacher, loss, optimiser and schedules for one (possibly distributed) run.

    Args:
        cfg: validated configuration.
        steps_per_epoch: optimiser steps per epoch (schedules are per iteration).
        world_size: number of data-parallel workers (for LR scaling).
        rank: this worker's rank (seeds its masking generator).
        wrap_student: e.g. DDP wrapping; the unwrapped student stays in ``self.student``.
    """

    def __init__(self, cfg: Config, steps_per_epoch: int, *, device: Optional[torch.device] = None,
                 world_size: int = 1, rank: int = 0,
                 wrap_student: Optional[Callable[[nn.Module], nn.Module]] = None) -> None:
        if steps_per_epoch < 1:
            raise ConfigError(f"steps_per_epoch={steps_per_epoch}: need at least one step per "
                              "epoch (more samples or a smaller train.batch_size_per_worker)")
        self.cfg, self.steps_per_epoch = cfg, steps_per_epoch
        self.device = device or resolve_device()
        self.precision = resolve_precision(cfg.train.precision, self.device)
        m, lc, o = cfg.model, cfg.loss, cfg.optim
        self.patch_loss = lc.framework == "ibot"

        student, teacher = initial_networks(cfg)
        self.student, self.teacher = student.to(self.device), teacher.to(self.device)
        self.student.backbone.checkpoint_blocks = cfg.train.checkpoint_blocks
        if cfg.train.compile:
            # Each block's attention and MLP, not the whole step: their shapes are static
            # (masked patches are replaced, not dropped), all blocks share one compiled graph
            # per input shape, and the data-dependent parts (mask choice, masked-patch head)
            # stay eager. Not the whole block: its drop-path rate differs per block (stochastic
            # depth), which would make every block a recompile.
            for net in (self.student, self.teacher):
                for block in net.backbone.blocks:
                    cast(nn.Module, block.attn).compile()
                    cast(nn.Module, block.mlp).compile()
        self.student_forward = wrap_student(self.student) if wrap_student else self.student

        self.masker = make_masker(cfg.masking.strategy, **cfg.masking.masker_kwargs())
        self.grid = m.grid
        self.loss = IBOTLoss(
            m.out_dim, m.out_dim if m.shared_head else m.patch_out_dim,
            student_temp=lc.student_temp, center_momentum=lc.center_momentum,
            lambda1=lc.lambda1, lambda2=lc.lambda2, patch_loss=self.patch_loss,
            centering=lc.centering).to(self.device)

        decay: list[nn.Parameter] = []
        no_decay: list[nn.Parameter] = []
        for name, p in self.student.named_parameters():
            if p.requires_grad:
                (no_decay if name.endswith(".bias") or p.ndim == 1 else decay).append(p)
        fused = self.device.type == "cuda"
        groups: list[dict[str, Any]] = [{"params": decay},
                                        {"params": no_decay, "weight_decay": 0.0}]
        self.optimizer = torch.optim.AdamW(groups,
                                           lr=0.0, fused=fused, foreach=None if fused else True)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16")

        global_batch = cfg.train.batch_size_per_worker * world_size
        peak_lr = o.lr * global_batch / o.lr_batch_reference
        args = (cfg.train.epochs, steps_per_epoch)
        self.lr_schedule = cosine_schedule(peak_lr, o.min_lr, *args, warmup_epochs=o.warmup_epochs)
        self.wd_schedule = cosine_schedule(o.weight_decay, o.weight_decay_end, *args)
        self.momentum_schedule = cosine_schedule(o.momentum_teacher, 1.0, *args)
        epochs = (lc.warmup_teacher_temp_epochs, cfg.train.epochs)  # per epoch, not per step
        self.teacher_temp_schedule = teacher_temperature(lc.warmup_teacher_temp,
                                                         lc.teacher_temp, *epochs)
        self.teacher_patch_temp_schedule = teacher_temperature(lc.warmup_teacher_patch_temp,
                                                               lc.teacher_patch_temp, *epochs)

        self.rank = rank
        self.generator = torch.Generator(self.device)
        self._teacher_params: list[torch.Tensor] = list(self.teacher.parameters())
        self._student_params: list[torch.Tensor] = list(self.student.parameters())
        self._last_layer = [p for n, p in self.student.named_parameters() if "last_layer" in n]
        self.step = 0
        # Training wall time over all sessions of the run (the loop advances it; monitors
        # excluded), kept in the checkpoint so a resumed run's time axis goes on, not back to 0.
        self.train_s = 0.0

    @property
    def epoch(self) -> int:
        return self.step // self.steps_per_epoch

    @property
    def total_steps(self) -> int:
        return len(self.lr_schedule)

    def autocast(self):
        """Mixed precision for the step, and the attention kernel that suits it."""
        stack = contextlib.ExitStack()
        if self.precision == "fp32":
            return stack
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
        stack.enter_context(torch.autocast(self.device.type, dtype=dtype))
        if self.device.type == "cpu" and dtype is torch.bfloat16:
            # The CPU flash-attention kernel's bf16 backward is slow at ViT sequence lengths:
            # the math kernel (which still reduces in fp32) measured 1.15-1.2x the whole
            # tiny-cpu step and 1.07-1.09x at vit-tiny-224 (docs/speed.md). In fp32 flash is
            # the faster one.
            stack.enter_context(sdpa_kernel(SDPBackend.MATH))
        return stack

    # ------------------------------------------------------------------------------------------

    def seed_step(self, step: int) -> None:
        """A step's randomness (masks, drop path) depends on (seed, rank, step) alone, so a run
        resumed from any checkpoint, on any rank, draws exactly what an uninterrupted run draws.
        Masking and the global stream (drop path) get seeds of their own: one shared seed would
        make drop path's uniforms the masking ratios' uniforms (the same Philox stream on CUDA,
        the same Mersenne stream on a CPU)."""
        torch.manual_seed(step_seed(self.cfg.train.seed, self.rank, step, "global"))
        self.generator.manual_seed(step_seed(self.cfg.train.seed, self.rank, step, "masking"))

    def train_step(self, global_crops: torch.Tensor,
                   local_crops: Optional[torch.Tensor] = None) -> StepMetrics:
        """One optimisation step.

        Args:
            global_crops: (G, B, 3, S, S), G global views of B images.
            local_crops: (L, B, 3, s, s) or None.
        """
        it, cfg, epoch = self.step, self.cfg, self.epoch
        self.seed_step(it)
        lr, wd, momentum = (float(s[it]) for s in
                            (self.lr_schedule, self.wd_schedule, self.momentum_schedule))
        teacher_temp, teacher_patch_temp = (float(s[min(epoch, len(s) - 1)]) for s in (
            self.teacher_temp_schedule, self.teacher_patch_temp_schedule))
        self.optimizer.param_groups[0].update(lr=lr, weight_decay=wd)
        self.optimizer.param_groups[1]["lr"] = lr
        images = global_crops.to(self.device, non_blocking=True).flatten(0, 1)
        locals_ = (local_crops.to(self.device, non_blocking=True).flatten(0, 1)
                   if local_crops is not None else None)

        with self.autocast():
            # 1. The teacher sees the full global crops; AttMask reads its [CLS] attention.
            with torch.no_grad():
                teacher = self.teacher.backbone.forward_tokens(
                    images, attn_layer=cfg.masking.layer if self.masker.needs_scores else None,
                    head_reduce=cfg.masking.head_reduce)
            # 2. Decide what to hide from the student.
            masks = self.masker(teacher.attention, self.grid, self.generator,
                                batch_size=len(images), device=self.device)
            # The teacher's targets, projected before the student runs, so the head's large
            # temporaries are freed before the student's activations are held for backward.
            with torch.no_grad():
                teacher_cls, teacher_patch, center_mean = self._teacher_logits(teacher, masks)
            # 3. The student sees masked global crops and unmasked local crops.
            student_cls, student_patch = self.student_forward(images, locals_, masks,
                                                              patch_logits=self.patch_loss)
            # 4. Distill the teacher into the student.
            losses = self.loss(student_cls, teacher_cls, teacher_temp, student_patch,
                               teacher_patch, masks, center_mean, teacher_patch_temp)

        # 5. Update the student.
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(losses["loss"]).backward()
        self.scaler.unscale_(self.optimizer)
        if cfg.optim.clip_grad > 0:
            clip_per_tensor_(self._student_params, cfg.optim.clip_grad)
        if epoch < cfg.optim.freeze_last_layer:
            for p in self._last_layer:
                p.grad = None
        self.scaler.step(self.optimizer)
        self.scaler.update()

        # 6. The teacher follows the student by EMA.
        with torch.no_grad():
            torch._foreach_lerp_(self._teacher_params, self._student_params, 1.0 - momentum)
        self.step += 1

        values = {k: v.detach() for k, v in losses.items()}
        values["masked_fraction"] = masks.float().mean()
        scalars = {"lr": lr, "weight_decay": wd, "teacher_momentum": momentum,
                   "teacher_temp": teacher_temp}
        return StepMetrics(values, scalars)

    def _teacher_logits(self, teacher, masks):
        """Teacher head on [CLS] and on the masked patches, plus the mean logits of the patches
        that feed the patch centre (all of them, or a ``loss.patch_center_sample`` share)."""
        if not self.patch_loss:
            return self.teacher.head(teacher.cls)[0], None, None
        patches = teacher.patches
        fraction = self.cfg.loss.patch_center_sample
        if fraction >= 1.0:
            cls_logits, all_patch = self.teacher.head(teacher.cls, patches.flatten(0, 1))
            center_mean = all_patch.float().mean(0, keepdim=True)
            return cls_logits, all_patch.view(*patches.shape[:2], -1)[masks], center_mean
        count = max(1, round(patches.shape[1] * fraction))
        noise = torch.rand(patches.shape[:2], device=patches.device, generator=self.generator)
        sample = noise.topk(count, dim=1).indices  # uniform subset per image
        sampled = patches.gather(1, sample[..., None].expand(-1, -1, patches.shape[-1]))
        masked = patches[masks]
        cls_logits, patch_logits = self.teacher.head(teacher.cls,
                                                     torch.cat([masked, sampled.flatten(0, 1)]))
        return (cls_logits, patch_logits[:len(masked)],
                patch_logits[len(masked):].float().mean(0, keepdim=True))

    # ------------------------------------------------------------------------------------------
    # State

    def state_dict(self) -> dict:
        return {"student": self.student.state_dict(), "teacher": self.teacher.state_dict(),
                "optimizer": self.optimizer.state_dict(), "loss": self.loss.state_dict(),
                "scaler": self.scaler.state_dict(), "step": self.step,
                "train_s": self.train_s, "config": self.cfg.to_yaml()}

    def load_state_dict(self, state: dict) -> None:
        self.student.load_state_dict(state["student"])
        self.teacher.load_state_dict(state["teacher"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.loss.load_state_dict(state["loss"])
        self.scaler.load_state_dict(state["scaler"])
        self.step = int(state["step"])
        self.train_s = float(state.get("train_s", 0.0))  # absent before 2026-11-29

    def save(self, path: str | Path, extra: Optional[dict] = None) -> Path:
        """Write the full state atomically (a crash mid-write never leaves a torn checkpoint)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        try:
            torch.save({**self.state_dict(), **(extra or {})}, tmp)
            os.replace(tmp, path)
        except (OSError, RuntimeError) as exc:  # a full disk: torch reports a failed write
            tmp.unlink(missing_ok=True)
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else \
                str(exc).strip().splitlines()[0][:120]
            raise CheckpointError(f"cannot write checkpoint {path} ({reason})") from exc
        return path

    def load(self, path: str | Path) -> dict:
        state = load_checkpoint(path, self.device)
        self.load_state_dict(state)
        return state


@torch.no_grad()
def clip_per_tensor_(params: list[torch.Tensor], max_norm: float) -> None:
    """Scale each gradient tensor to at most ``max_norm`` (DINO/iBOT semantics), no host sync."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    scale = torch._foreach_add(torch._foreach_norm(grads), 1e-6)
    torch._foreach_reciprocal_(scale)
    torch._foreach_mul_(scale, max_norm)
    torch._foreach_clamp_max_(scale, 1.0)
    torch._foreach_mul_(grads, scale)


def check_finite(metrics: dict[str, float], step: int) -> None:
    loss = metrics.get("loss")
    if loss is not None and not np.isfinite(loss):
        raise NonFiniteLossError(f"loss is {loss} at step {step}; stopping (the last checkpoint "
                                 "is intact; lower optim.lr or use train.precision=fp32)")
