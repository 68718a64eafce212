"""iBOT loss: self-distillation on [CLS] plus masked-patch distillation (Zhou et al., ICLR 2022).

Reduction as in the reference implementation: [CLS] cross-entropy averaged over every (teacher
global view, other student view) pair; patch cross-entropy averaged per image over its masked
patches, then over all images of both global views (unmasked images count as 0). Two centres
(EMA 0.9), one for the [CLS] logits and one for the patch logits, keep the teacher from
collapsing. ``centering="sinkhorn"`` replaces them with three Sinkhorn-Knopp iterations over the
batch (SwAV, Caron et al. 2020; the teacher of DINOv2, Oquab et al. 2023): the targets of a batch
then spread evenly over the prototypes from the first step. ``patch_loss=False``
(``framework="dino"``) keeps the [CLS] term only. The teacher temperatures come with each call
(their schedule lives with the other schedules, in ``attmask.runtime``).
"""
from __future__ import annotations

import math
from typing import Optional, cast

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


class IBOTLoss(nn.Module):
    """The iBOT objective and its two centres.

    Shapes, with B images per view, G global views (2), V views in all (G + local), K [CLS]
    prototypes and K' patch prototypes:
    ``student_cls`` (V*B, K), the global views first; ``teacher_cls`` (G*B, K);
    ``masks`` (G*B, P) bool, True where the student saw the mask token; ``student_patch`` and
    ``teacher_patch`` (M, K'), the logits at the M masked positions in ``masks``' row-major
    order; ``center_patches`` (S, K'), teacher patch logits the patch centre is estimated from
    (their (1, K') mean gives the same update).
    """

    center: torch.Tensor  # buffers, registered in __init__
    patch_center: torch.Tensor

    def __init__(self, out_dim: int, patch_out_dim: int, *, num_global: int = 2,
                 student_temp: float = 0.1, center_momentum: float = 0.9, lambda1: float = 1.0,
                 lambda2: float = 1.0, patch_loss: bool = True,
                 centering: str = "center") -> None:
        super().__init__()
        if centering not in ("center", "sinkhorn"):
            raise ValueError(f"centering={centering!r}: allowed values are center, sinkhorn")
        self.centering = centering
        self.num_global, self.student_temp = num_global, student_temp
        self.center_momentum, self.lambda1, self.lambda2 = center_momentum, lambda1, lambda2
        self.patch_loss = patch_loss
        self.register_buffer("center", torch.zeros(1, out_dim))  # of the [CLS] logits
        self.register_buffer("patch_center", torch.zeros(1, patch_out_dim))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Checkpoints written before the rename call the patch centre "center2".
        if prefix + "center2" in state_dict:
            state_dict[prefix + "patch_center"] = state_dict.pop(prefix + "center2")
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, student_cls: torch.Tensor, teacher_cls: torch.Tensor, teacher_temp: float,
                student_patch: Optional[torch.Tensor] = None,
                teacher_patch: Optional[torch.Tensor] = None,
                masks: Optional[torch.Tensor] = None,
                center_patches: Optional[torch.Tensor] = None,
                teacher_patch_temp: Optional[float] = None) -> dict[str, torch.Tensor]:
        """Losses (``loss``, ``cls_loss``, ``patch_loss``) and ``teacher_flatness``; updates
        the centres. ``teacher_patch_temp`` defaults to ``teacher_temp``."""
        cls_loss, flatness = self._cls_loss(student_cls, teacher_cls, teacher_temp)
        losses = {"cls_loss": cls_loss, "teacher_flatness": flatness}
        total = self.lambda1 * cls_loss
        if self.patch_loss:
            patch_temp = teacher_temp if teacher_patch_temp is None else teacher_patch_temp
            patch_loss = self._patch_loss(student_patch, teacher_patch, masks, patch_temp)
            losses["patch_loss"] = patch_loss
            total = total + self.lambda2 * patch_loss
        losses["loss"] = total
        self.update_centers(teacher_cls, center_patches)
        return losses

    def _cls_loss(self, student_cls, teacher_cls, temp) -> tuple[torch.Tensor, torch.Tensor]:
        views = len(student_cls) // (len(teacher_cls) // self.num_global)
        log_s = F.log_softmax(student_cls.float() / self.student_temp, dim=-1).chunk(views)
        t = self._targets(teacher_cls, self.center, temp).chunk(self.num_global)
        # sum_{v != q} CE(t_q, s_v) = -t_q . (sum_v log s_v - log s_q): one pass over the views
        all_views = torch.stack(log_s).sum(0)
        total = cast(torch.Tensor, sum(-(t_q * (all_views - log_s[q])).sum(-1).mean()
                                       for q, t_q in enumerate(t)))
        # Diagnostic: the teacher's entropy over log K. Near 1 the targets are uniform (DINO's
        # "uniform collapse"): the loss is about log K and carries almost no signal.
        with torch.no_grad():
            probs = torch.cat(t)
            flatness = -(probs * probs.clamp_min(1e-12).log()).sum(-1).mean() / math.log(
                probs.shape[-1])
        return total / (self.num_global * (views - 1)), flatness

    def _patch_loss(self, student_patch, teacher_patch, masks, temp) -> torch.Tensor:
        t = self._targets(teacher_patch, self.patch_center, temp)
        ce = -(t * F.log_softmax(student_patch.float() / self.student_temp, dim=-1)).sum(-1)
        image = masks.nonzero()[:, 0]  # same row-major order as the boolean gather of tokens
        per_image = torch.zeros(len(masks), device=ce.device).index_add_(0, image, ce)
        return (per_image / masks.sum(1).clamp(min=1)).mean()

    def _targets(self, logits: torch.Tensor, center: torch.Tensor, temp: float) -> torch.Tensor:
        """The teacher's target distributions, one row per input row."""
        if self.centering == "sinkhorn":
            return sinkhorn_knopp(logits.float() / temp)
        return F.softmax((logits.float() - center) / temp, dim=-1)

    @torch.no_grad()
    def update_centers(self, teacher_cls: torch.Tensor,
                       center_patches: Optional[torch.Tensor]) -> None:
        if self.centering == "sinkhorn":  # the centres are not used
            return
        m = self.center_momentum
        self.center.mul_(m).add_(_global_mean(teacher_cls.float()), alpha=1 - m)
        if self.patch_loss and center_patches is not None:
            self.patch_center.mul_(m).add_(_global_mean(center_patches.float()), alpha=1 - m)


@torch.no_grad()
def sinkhorn_knopp(scores: torch.Tensor, iterations: int = 3) -> torch.Tensor:
    """Rows of ``scores`` (N, K) -> target distributions whose columns share the batch evenly.

    Alternately normalises prototypes (columns, each to 1/K of the mass) and samples (rows, each
    to 1/N), as SwAV and DINOv2's teacher do, over all ranks' rows. Runs in the log domain:
    at the sharp temperatures of the CPU recipe (0.02) ``exp(scores)`` overflows fp32.
    """
    log_q = scores.float()
    n = _global_count(len(log_q))
    for _ in range(iterations):
        log_q = log_q - _global_logsumexp(log_q) - math.log(log_q.shape[1])  # columns: 1/K each
        log_q = log_q - torch.logsumexp(log_q, dim=1, keepdim=True) - math.log(n)  # rows: 1/N
    return (log_q + math.log(n)).exp()  # each row a distribution


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _global_count(n: int) -> int:
    return n * dist.get_world_size() if _distributed() else n


def _global_logsumexp(log_q: torch.Tensor) -> torch.Tensor:
    """(1, K) log of the column sums over every rank's rows."""
    peak = log_q.max(0, keepdim=True).values
    if _distributed():
        dist.all_reduce(peak, op=dist.ReduceOp.MAX)
    sums = (log_q - peak).exp().sum(0, keepdim=True)
    if _distributed():
        dist.all_reduce(sums)
    return sums.log() + peak


def _global_mean(x: torch.Tensor) -> torch.Tensor:
    mean = x.mean(0, keepdim=True)
    if _distributed():
        dist.all_reduce(mean)
        mean /= dist.get_world_size()
    return mean
