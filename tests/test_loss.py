import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from attmask.loss import IBOTLoss, sinkhorn_knopp
from attmask.runtime import teacher_temperature


def reference_ibot_loss(s_cls, t_cls, s_patch_full, t_patch_full, masks, center, center2,
                        temp, patch_temp, student_temp=0.1, n_global=2):
    """The reference reduction written out with loops over full patch tensors (section 3.2)."""
    views = len(s_cls) // (len(t_cls) // n_global)
    s_c = (s_cls / student_temp).chunk(views)
    t_c = F.softmax((t_cls - center) / temp, -1).chunk(n_global)
    s_p = (s_patch_full / student_temp).chunk(n_global)
    t_p = F.softmax((t_patch_full - center2) / patch_temp, -1).chunk(n_global)
    m = masks.chunk(n_global)
    cls_total, cls_n, patch_total, patch_n = 0, 0, 0, 0
    for q in range(n_global):
        for v in range(views):
            if v == q:
                ce = torch.sum(-t_p[q] * F.log_softmax(s_p[v], -1), -1)  # (B, P)
                per_image = (ce * m[v].float()).sum(-1) / m[v].sum(-1).clamp(min=1.0)
                patch_total += per_image.mean()
                patch_n += 1
            else:
                cls_total += torch.sum(-t_c[q] * F.log_softmax(s_c[v], -1), -1).mean()
                cls_n += 1
    return cls_total / cls_n, patch_total / patch_n


def make_inputs(B=3, views=6, P=16, K=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    s_cls = torch.randn(views * B, K, generator=g)
    t_cls = torch.randn(2 * B, K, generator=g)
    s_patch = torch.randn(2 * B, P, K, generator=g)
    t_patch = torch.randn(2 * B, P, K, generator=g)
    masks = torch.rand(2 * B, P, generator=g) < 0.3
    masks[1] = False  # an unmasked image still counts (as 0) in the mean
    masks[4, :12] = True  # a heavily masked image does not get extra weight
    return s_cls, t_cls, s_patch, t_patch, masks


def test_matches_reference_reduction_with_gathered_tokens():
    s_cls, t_cls, s_patch, t_patch, masks = make_inputs()
    loss = IBOTLoss(40, 40)
    loss.center.normal_()
    loss.patch_center.normal_()
    c1, c2 = loss.center.clone(), loss.patch_center.clone()
    temps = teacher_temperature(0.04, 0.07, 5, 10)
    out = loss(s_cls, t_cls, temps[2], s_patch[masks], t_patch[masks], masks,
               center_patches=t_patch.flatten(0, 1))
    ref_cls, ref_patch = reference_ibot_loss(s_cls, t_cls, s_patch, t_patch, masks, c1, c2,
                                             temps[2], temps[2])
    assert torch.allclose(out["cls_loss"], ref_cls, atol=1e-5)
    assert torch.allclose(out["patch_loss"], ref_patch, atol=1e-5)
    assert torch.allclose(out["loss"], ref_cls + ref_patch, atol=1e-5)
    # a flat mean over all masked tokens is a different (wrong) reduction
    ce = -(F.softmax((t_patch[masks] - c2) / temps[2], -1)
           * F.log_softmax(s_patch[masks] / 0.1, -1)).sum(-1)
    assert not torch.allclose(ce.mean(), out["patch_loss"], atol=1e-3)


def test_centers_are_ema_of_teacher_means():
    s_cls, t_cls, s_patch, t_patch, masks = make_inputs()
    loss = IBOTLoss(40, 40, center_momentum=0.9)
    loss(s_cls, t_cls, 0.04, s_patch[masks], t_patch[masks], masks, t_patch.flatten(0, 1))
    assert torch.allclose(loss.center, 0.1 * t_cls.mean(0, keepdim=True), atol=1e-6)
    # the patch centre averages over all patches, not only the masked ones
    assert torch.allclose(loss.patch_center, 0.1 * t_patch.mean((0, 1))[None], atol=1e-6)


def test_lambdas_weight_the_terms_and_dino_drops_the_patch_term():
    s_cls, t_cls, s_patch, t_patch, masks = make_inputs()
    weighted = IBOTLoss(40, 40, lambda1=0.5, lambda2=2.0)(
        s_cls, t_cls, 0.04, s_patch[masks], t_patch[masks], masks, t_patch.flatten(0, 1))
    assert torch.allclose(weighted["loss"],
                          0.5 * weighted["cls_loss"] + 2.0 * weighted["patch_loss"])
    dino = IBOTLoss(40, 40, patch_loss=False)(s_cls, t_cls, 0.04)
    assert "patch_loss" not in dino and torch.equal(dino["loss"], dino["cls_loss"])


def test_teacher_temperature_warmup_schedule():
    temps = teacher_temperature(0.04, 0.07, 30, 100)
    assert len(temps) == 100 and temps[0] == pytest.approx(0.04)
    assert temps[29] == pytest.approx(0.07) and np.all(temps[30:] == 0.07)
    assert np.all(np.diff(temps[:30]) > 0)
    assert len(teacher_temperature(0.04, 0.07, 30, 10)) == 10  # shorter runs truncate


def test_teacher_flatness_is_one_for_uniform_targets_and_small_for_peaked_ones():
    loss = IBOTLoss(64, 64, patch_loss=False)
    student = torch.randn(8, 64)
    same = loss(student, torch.zeros(4, 64), 0.07)  # every logit equal: uniform targets
    assert same["teacher_flatness"].item() == pytest.approx(1.0, abs=1e-6)
    assert same["cls_loss"].item() > math.log(64) - 1e-3  # CE against uniform >= log K
    peaked = torch.full((4, 64), -10.0)
    peaked[:, 0] = 10.0
    fresh = IBOTLoss(64, 64, patch_loss=False)
    assert fresh(student, peaked, 0.07)["teacher_flatness"].item() < 0.01


def test_patch_temperature_is_its_own_and_old_checkpoints_name_the_patch_centre_center2():
    s_cls, t_cls, s_patch, t_patch, masks = make_inputs()
    loss = IBOTLoss(40, 40)
    args = (s_cls, t_cls, 0.04, s_patch[masks], t_patch[masks], masks)
    same = loss(*args, teacher_patch_temp=0.04)["patch_loss"]
    assert torch.equal(IBOTLoss(40, 40)(*args)["patch_loss"], same)  # defaults to teacher_temp
    assert not torch.allclose(IBOTLoss(40, 40)(*args, teacher_patch_temp=0.07)["patch_loss"], same)
    old = {"center": torch.ones(1, 40), "center2": torch.full((1, 40), 2.0)}
    restored = IBOTLoss(40, 40)
    restored.load_state_dict(old)
    assert torch.equal(restored.patch_center, torch.full((1, 40), 2.0))


def reference_sinkhorn(scores, iterations=3):
    """SwAV / DINOv2's teacher written in the linear domain (safe at moderate temperatures)."""
    q = torch.exp(scores).t()  # (K, N)
    k, n = q.shape
    q /= q.sum()
    for _ in range(iterations):
        q /= q.sum(1, keepdim=True)
        q /= k
        q /= q.sum(0, keepdim=True)
        q /= n
    return (q * n).t()


def test_sinkhorn_matches_the_linear_domain_reference_and_spreads_the_batch():
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(24, 16, generator=g) * 3
    targets = sinkhorn_knopp(scores)
    assert torch.allclose(targets, reference_sinkhorn(scores), atol=1e-6)
    assert torch.allclose(targets.sum(1), torch.ones(24), atol=1e-6)  # rows are distributions
    # one image's logits all alike but one prototype: softmax puts (nearly) the whole batch
    # on that prototype; Sinkhorn-Knopp spreads it towards 24/16 = 1.5 images per prototype
    collapsed = torch.randn(24, 16, generator=g) * 0.1
    collapsed[:, 3] += 5.0
    assert F.softmax(collapsed, -1)[:, 3].sum() > 20
    converged = sinkhorn_knopp(collapsed, iterations=200)
    assert torch.allclose(converged.sum(0), torch.full((16,), 1.5), atol=1e-3)


def test_sinkhorn_is_finite_at_a_sharp_temperature():
    scores = torch.randn(64, 256, generator=torch.Generator().manual_seed(1)) * 40 / 0.02
    assert torch.isinf(torch.exp(scores)).any()  # why it runs in the log domain
    targets = sinkhorn_knopp(scores)
    assert torch.isfinite(targets).all()
    assert torch.allclose(targets.sum(1), torch.ones(64), atol=1e-5)


def test_sinkhorn_centering_uses_its_targets_and_leaves_the_centres_alone():
    s_cls, t_cls, s_patch, t_patch, masks = make_inputs()
    loss = IBOTLoss(40, 40, centering="sinkhorn")
    out = loss(s_cls, t_cls, 0.04, s_patch[masks], t_patch[masks], masks, t_patch.flatten(0, 1))
    assert torch.equal(loss.center, torch.zeros(1, 40))
    assert torch.equal(loss.patch_center, torch.zeros(1, 40))
    views = len(s_cls) // (len(t_cls) // 2)
    log_s = F.log_softmax(s_cls / 0.1, -1).chunk(views)
    t = sinkhorn_knopp(t_cls / 0.04).chunk(2)
    expected = sum(-(t[q] * log_s[v]).sum(-1).mean()
                   for q in range(2) for v in range(views) if v != q) / (2 * (views - 1))
    assert torch.allclose(out["cls_loss"], expected, atol=1e-5)
    centred = IBOTLoss(40, 40)(s_cls, t_cls, 0.04, s_patch[masks], t_patch[masks], masks)
    assert not torch.allclose(out["patch_loss"], centred["patch_loss"], atol=1e-3)
    with pytest.raises(ValueError, match="centering"):
        IBOTLoss(40, 40, centering="kmeans")
