import copy
import math

import pytest
import torch

from attmask.engine import Engine, NonFiniteLossError, check_finite, clip_per_tensor_
from attmask.runtime import load_checkpoint
from conftest import tiny_config


def batch(seed=0, B=8):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, B, 3, 32, 32, generator=g), torch.randn(2, B, 3, 16, 16, generator=g)


def test_clip_per_tensor_scales_each_gradient_separately():
    a, b = torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(2))
    a.grad, b.grad = torch.tensor([30.0, 40.0, 0.0]), torch.tensor([0.3, 0.4])
    clip_per_tensor_([a, b], 3.0)
    assert a.grad.norm() == pytest.approx(3.0, rel=1e-5)  # norm 50 -> 3
    assert torch.allclose(b.grad, torch.tensor([0.3, 0.4]))  # norm 0.5 untouched


@pytest.mark.parametrize("strategy", ["random", "block", "attmask_high", "attmask_low",
                                      "attmask_hint"])
def test_step_runs_for_every_strategy_and_reports_metrics(strategy):
    engine = Engine(tiny_config(f"masking.strategy={strategy}"), steps_per_epoch=4)
    metrics = engine.train_step(*batch()).as_floats()
    assert {"loss", "cls_loss", "patch_loss", "masked_fraction", "lr", "weight_decay",
            "teacher_momentum", "teacher_temp"} <= set(metrics)
    assert math.isfinite(metrics["loss"]) and 0 < metrics["masked_fraction"] < 0.5
    assert engine.step == 1


def test_masking_draws_and_drop_path_draws_of_one_step_are_independent():
    """Seeded alike, the masker's generator and the global stream (drop path) drew the same
    uniforms every step; each now has a seed of its own, still a function of the step alone."""
    engine = Engine(tiny_config("model.drop_path=0.1"), steps_per_epoch=4)
    draws = []
    for _ in range(2):
        engine.seed_step(7)
        masking = torch.rand(4096, generator=engine.generator)
        drop_path = torch.rand(4096)  # what timm's DropPath draws from
        draws.append((masking, drop_path))
    (masking, drop_path), again = draws
    assert torch.equal(masking, again[0]) and torch.equal(drop_path, again[1])  # resume-exact
    assert not torch.equal(masking, drop_path)
    assert abs(torch.corrcoef(torch.stack([masking, drop_path]))[0, 1]) < 0.1


def test_teacher_attention_drives_attmask_masks():
    engine = Engine(tiny_config("masking.prob=1.0", "masking.ratio=[0.3,0.3]"), steps_per_epoch=4)
    seen = {}
    original = engine.masker

    def spy(scores, grid, generator=None, **kw):
        seen["scores"] = scores
        seen["mask"] = original(scores, grid, generator, **kw)
        return seen["mask"]

    engine.masker = spy
    engine.masker.needs_scores = True
    images, local = batch()
    with torch.no_grad():
        expected = engine.teacher.backbone.forward_tokens(images.flatten(0, 1), attn_layer=-1)
    engine.train_step(images, local)
    assert torch.allclose(seen["scores"], expected.attention, atol=1e-6)
    top = expected.attention.topk(math.floor(64 * 0.3), dim=1).indices
    assert torch.equal(seen["mask"], torch.zeros_like(seen["mask"]).scatter_(1, top, True))


def test_last_layer_frozen_in_first_epoch_and_ema_update():
    engine = Engine(tiny_config("optim.freeze_last_layer=1", "optim.lr=0.1"), steps_per_epoch=2)
    last = engine.student.head.last_layer.weight_v
    before = last.detach().clone()
    teacher_before = copy.deepcopy(engine.teacher.state_dict())
    student_before = copy.deepcopy(engine.student.state_dict())
    engine.train_step(*batch())
    assert torch.equal(last, before)  # epoch 0: frozen
    m = engine.momentum_schedule[0]
    name = "backbone.blocks.0.mlp.fc1.weight"
    expected = m * teacher_before[name] + (1 - m) * engine.student.state_dict()[name]
    assert torch.allclose(engine.teacher.state_dict()[name], expected, atol=1e-6)
    assert not torch.equal(engine.student.state_dict()[name], student_before[name])
    engine.train_step(*batch(1))
    engine.train_step(*batch(2))  # epoch 1
    assert not torch.equal(last, before)


def test_weight_decay_skips_biases_and_norms():
    engine = Engine(tiny_config(), steps_per_epoch=2)
    decay, no_decay = engine.optimizer.param_groups
    assert all(p.ndim >= 2 for p in decay["params"])
    assert all(p.ndim < 2 for p in no_decay["params"]) and no_decay["weight_decay"] == 0.0
    engine.train_step(*batch())
    assert decay["weight_decay"] == pytest.approx(engine.wd_schedule[0])


def test_resume_is_bit_for_bit(tmp_path):
    cfg = tiny_config("masking.strategy=attmask_hint", "model.drop_path=0.2")
    straight = Engine(cfg, steps_per_epoch=2)
    for i in range(4):
        straight.train_step(*batch(i))
    first = Engine(cfg, steps_per_epoch=2)
    for i in range(2):
        first.train_step(*batch(i))
    path = first.save(tmp_path / "ckpt.pt")
    torch.manual_seed(1234)  # a fresh process would have some other RNG state
    resumed = Engine(cfg, steps_per_epoch=2)
    state = resumed.load(path)
    assert state["step"] == 2 and resumed.epoch == 1
    for i in range(2, 4):
        resumed.train_step(*batch(i))
    for (name, a), b in zip(straight.teacher.state_dict().items(),
                            resumed.teacher.state_dict().values()):
        assert torch.equal(a, b), name
    assert torch.equal(straight.loss.center, resumed.loss.center)


def test_step_randomness_depends_on_seed_rank_and_step_only():
    cfg = tiny_config("masking.strategy=random", "model.drop_path=0.2")
    students = {}
    for name, rank, noise in (("a", 0, False), ("b", 0, True), ("c", 1, False)):
        engine = Engine(cfg, steps_per_epoch=2, rank=rank)
        for i in range(2):
            if noise:
                torch.rand(1000)  # anything else the process draws between steps
            engine.train_step(*batch(i))
        students[name] = engine.student.state_dict()
    for key, value in students["a"].items():
        assert torch.equal(value, students["b"][key]), key
    assert not all(torch.equal(v, students["c"][k]) for k, v in students["a"].items())


def test_checkpoint_holds_only_safe_types(tmp_path):
    engine = Engine(tiny_config(), steps_per_epoch=2)
    engine.train_step(*batch())
    path = engine.save(tmp_path / "c.pt")
    state = load_checkpoint(path)  # weights_only=True: no pickled code
    assert {"student", "teacher", "optimizer", "loss", "config", "step"} <= set(state)
    assert not list(tmp_path.glob("*.tmp"))


def test_check_finite_names_the_step():
    check_finite({"loss": 1.0}, 3)
    with pytest.raises(NonFiniteLossError, match="step 7"):
        check_finite({"loss": float("nan")}, 7)


@pytest.mark.skipif(not torch.cpu._is_avx512_bf16_supported(), reason="no CPU bf16")
def test_bf16_autocast_step():
    engine = Engine(tiny_config("train.precision=bf16"), steps_per_epoch=2)
    assert engine.precision == "bf16"
    assert math.isfinite(engine.train_step(*batch()).as_floats()["loss"])


@pytest.mark.parametrize("precision, flash", [("bf16", False), ("fp32", True)])
def test_cpu_attention_kernel_follows_the_precision(precision, flash):
    """bf16 on a CPU runs attention with the math kernel (faster there), fp32 keeps flash, and
    the choice does not leak out of the step."""
    engine = Engine(tiny_config(f"train.precision={precision}"), steps_per_epoch=2)
    with engine.autocast():
        assert torch.backends.cuda.flash_sdp_enabled() is flash
        assert torch.backends.cuda.math_sdp_enabled()
    assert torch.backends.cuda.flash_sdp_enabled()


def test_dino_framework_and_unshared_head_and_center_sampling():
    dino = Engine(tiny_config("loss.framework=dino"), steps_per_epoch=2)
    metrics = dino.train_step(*batch()).as_floats()
    assert "patch_loss" not in metrics and 0 < metrics["masked_fraction"]
    unshared = Engine(tiny_config("model.shared_head=false", "model.patch_out_dim=96"),
                      steps_per_epoch=2)
    assert math.isfinite(unshared.train_step(*batch()).as_floats()["patch_loss"])
    # A sampled patch centre estimates the full one from a quarter of the patches: close to
    # it (same seed, same batch) but not equal.
    full = Engine(tiny_config(), steps_per_epoch=2)
    sampled = Engine(tiny_config("loss.patch_center_sample=0.25"), steps_per_epoch=2)
    inputs = batch()
    full.train_step(*inputs)
    sampled.train_step(*inputs)
    a, b = full.loss.patch_center, sampled.loss.patch_center
    assert not torch.equal(a, b)
    assert torch.nn.functional.cosine_similarity(a, b).item() > 0.9


def test_head_batch_norm_trains_and_resumes_exactly(tmp_path):
    cfg = tiny_config("model.head_bn=true")
    straight = Engine(cfg, steps_per_epoch=4)
    for _ in range(2):
        straight.train_step(*batch())
    path = straight.save(tmp_path / "s.pt")
    for _ in range(2):
        straight.train_step(*batch())
    resumed = Engine(cfg, steps_per_epoch=4)
    resumed.load(path)
    for _ in range(2):
        resumed.train_step(*batch())
    for (name, a), b in zip(straight.teacher.state_dict().items(),
                            resumed.teacher.state_dict().values()):
        assert torch.equal(a, b), name  # BN running statistics included


def _losses_and_teacher(cfg, steps=3):
    torch.manual_seed(0)
    engine = Engine(cfg, steps_per_epoch=3)
    losses = [engine.train_step(*batch(i)).as_floats()["loss"] for i in range(steps)]
    return engine, losses


def test_activation_checkpointing_gives_the_same_steps():
    """Recomputing the student's blocks in backward changes memory, not the run: same losses and
    teacher (drop path included, whose draws the recomputation must replay)."""
    cfg = tiny_config("train.precision=fp32", "model.drop_path=0.2")
    plain, plain_losses = _losses_and_teacher(cfg)
    ckpt_cfg = copy.deepcopy(cfg)
    ckpt_cfg.train.checkpoint_blocks = 2  # every block of the tiny model
    ckpt, ckpt_losses = _losses_and_teacher(ckpt_cfg)
    assert ckpt.student.backbone.checkpoint_blocks == 2 and ckpt.teacher.backbone.checkpoint_blocks == 0
    assert ckpt_losses == pytest.approx(plain_losses, rel=1e-6)
    for (name, a), b in zip(plain.teacher.state_dict().items(), ckpt.teacher.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6), name
    assert _saved_bytes(ckpt) < 0.7 * _saved_bytes(plain)  # and it does hold less for backward


def _saved_bytes(engine) -> int:
    """Bytes the autograd graph keeps for backward during one step (checkpointed blocks keep
    only their inputs; their own saved tensors are the checkpoint's business)."""
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        engine.train_step(*batch(9))
    return total


def test_compiled_blocks_match_eager_and_keep_the_state_dict():
    """train.compile: 5 fp32 steps match eager within 1e-4 relative, checkpoints keep timm's
    keys, and after the first step nothing recompiles (the shapes are static)."""
    from torch._dynamo.utils import counters

    cfg = tiny_config("train.precision=fp32", "masking.strategy=attmask_high")
    eager, eager_losses = _losses_and_teacher(cfg, steps=5)
    compiled_cfg = copy.deepcopy(cfg)
    compiled_cfg.train.compile = True
    torch._dynamo.reset()
    torch.manual_seed(0)
    engine = Engine(compiled_cfg, steps_per_epoch=3)
    losses = [engine.train_step(*batch(0)).as_floats()["loss"]]
    graphs_after_first = counters["stats"]["unique_graphs"]
    losses += [engine.train_step(*batch(i)).as_floats()["loss"] for i in range(1, 5)]
    assert losses == pytest.approx(eager_losses, rel=1e-4)
    assert graphs_after_first > 0
    assert counters["stats"]["unique_graphs"] == graphs_after_first  # no recompiles
    assert list(engine.teacher.state_dict()) == list(eager.teacher.state_dict())
    torch._dynamo.reset()
