"""iBOT loss: self-distillation on [CLS] plus masked-patch distillation (Zhou et al., ICLR 2022).

Reduction as in the reference implementation: [CLS] cross-entropy averaged over every (teacher
global view, other student view) pair; patch cross-entropy averaged per image over its masked
patches, then over all images of both global views (unmasked images count as 0). Two centres
(EMA 0.9) keep the teacher from collapsing. ``framework="dino"`` keeps the [CLS] term only.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


def teacher_temperature(warmup: float, final: float, warmup_epochs: int, epochs: int) -> np.ndarray:
    """Per-epoch teacher temperature: linear warm-up, then constant."""
    warm = np.linspace(warmup, final, warmup_epochs)
    return np.concatenate([warm, np.full(max(0, epochs - warmup_epochs), final)])[:epochs]


class IBOTLoss(nn.Module):
    def __init__(self, out_dim: int, patch_out_dim: int, *, epochs: int, num_global: int = 2,
                 warmup_teacher_temp: float = 0.04, teacher_temp: float = 0.07,
                 warmup_teacher_patch_temp: float = 0.04, teacher_patch_temp: float = 0.07,
                 warmup_teacher_temp_epochs: int = 30, student_temp: float = 0.1,
                 center_momentum: float = 0.9, lambda1: float = 1.0, lambda2: float = 1.0,
                 patch_loss: bool = True) -> None:
        super().__init__()
        self.num_global, self.student_temp = num_global, student_temp
        self.center_momentum, self.lambda1, self.lambda2 = center_momentum, lambda1, lambda2
        self.patch_loss = patch_loss
        self.register_buffer("center", torch.zeros(1, out_dim))
        self.register_buffer("center2", torch.zeros(1, patch_out_dim))
        self.teacher_temps = teacher_temperature(warmup_teacher_temp, teacher_temp,
                                                 warmup_teacher_temp_epochs, epochs)
        self.teacher_patch_temps = teacher_temperature(warmup_teacher_patch_temp,
                                                       teacher_patch_temp,
                                                       warmup_teacher_temp_epochs, epochs)

    def forward(self, student_cls: torch.Tensor, teacher_cls: torch.Tensor, epoch: int,
                student_patch: Optional[torch.Tensor] = None,
                teacher_patch: Optional[torch.Tensor] = None,
                masks: Optional[torch.Tensor] = None,
                center_patches: Optional[torch.Tensor] = None) -> dict[str, torch.Tensor]:
        """
        Args:
            student_cls: (V*B, K) logits of all student views, the global views first.
            teacher_cls: (G*B, K) logits of the teacher's global views.
            student_patch, teacher_patch: (M, K') logits at the masked positions ``masks``.
            masks: (G*B, P) bool, True where the student saw the mask token.
            center_patches: (S, K') teacher patch logits the patch centre is estimated from
                (their (1, K') mean gives the same update).
        """
        epoch = min(epoch, len(self.teacher_temps) - 1)
        cls_loss, flatness = self._cls_loss(student_cls, teacher_cls, self.teacher_temps[epoch])
        losses = {"cls_loss": cls_loss, "teacher_flatness": flatness}
        total = self.lambda1 * cls_loss
        if self.patch_loss:
            patch_loss = self._patch_loss(student_patch, teacher_patch, masks,
                                          self.teacher_patch_temps[epoch])
            losses["patch_loss"] = patch_loss
            total = total + self.lambda2 * patch_loss
        losses["loss"] = total
        self.update_centers(teacher_cls, center_patches)
        return losses

    def _cls_loss(self, student_cls, teacher_cls, temp) -> torch.Tensor:
        views = len(student_cls) // (len(teacher_cls) // self.num_global)
        log_s = F.log_softmax(student_cls.float() / self.student_temp, dim=-1).chunk(views)
        t = F.softmax((teacher_cls.float() - self.center) / temp, dim=-1).chunk(self.num_global)
        # sum_{v != q} CE(t_q, s_v) = -t_q . (sum_v log s_v - log s_q): one pass over the views
        all_views = torch.stack(log_s).sum(0)
        total = sum(-(t_q * (all_views - log_s[q])).sum(-1).mean() for q, t_q in enumerate(t))
        # Diagnostic: the teacher's entropy over log K. Near 1 the targets are uniform (DINO's
        # "uniform collapse"): the loss is about log K and carries almost no signal.
        with torch.no_grad():
            probs = torch.cat(t)
            flatness = -(probs * probs.clamp_min(1e-12).log()).sum(-1).mean() / np.log(
                probs.shape[-1])
        return total / (self.num_global * (views - 1)), flatness

    def _patch_loss(self, student_patch, teacher_patch, masks, temp) -> torch.Tensor:
        t = F.softmax((teacher_patch.float() - self.center2) / temp, dim=-1)
        ce = -(t * F.log_softmax(student_patch.float() / self.student_temp, dim=-1)).sum(-1)
        image = masks.nonzero()[:, 0]  # same row-major order as the boolean gather of tokens
        per_image = torch.zeros(len(masks), device=ce.device).index_add_(0, image, ce)
        return (per_image / masks.sum(1).clamp(min=1)).mean()

    @torch.no_grad()
    def update_centers(self, teacher_cls: torch.Tensor,
                       center_patches: Optional[torch.Tensor]) -> None:
        m = self.center_momentum
        self.center.mul_(m).add_(_global_mean(teacher_cls.float()), alpha=1 - m)
        if self.patch_loss and center_patches is not None:
            self.center2.mul_(m).add_(_global_mean(center_patches.float()), alpha=1 - m)


def _global_mean(x: torch.Tensor) -> torch.Tensor:
    mean = x.mean(0, keepdim=True)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(mean)
        mean /= dist.get_world_size()
    return mean
