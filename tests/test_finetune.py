"""Fine-tuning evaluation (attmask/eval/finetune.py): layer-wise LR decay and a short schedule."""
import pytest
import torch
from torch import nn

from attmask.errors import UserError
from attmask.eval.finetune import finetune, layer_decay_groups, layer_id, train_finetune
from attmask.eval.suite import EvalOptions, Evaluator
from attmask.models.vit import build_backbone
from conftest import tiny_config


def tiny_backbone():
    torch.manual_seed(0)
    return build_backbone(tiny_config().model)  # 2 blocks, 32 px, patch 4


def test_layer_ids_and_learning_rates_decay_from_the_head_down():
    backbone, head = tiny_backbone(), nn.Linear(192, 3)
    depth = len(backbone.blocks)
    assert layer_id("patch_embed.proj.weight", depth) == layer_id("cls_token", depth) == 0
    assert layer_id("blocks.1.mlp.fc1.weight", depth) == 2 and layer_id("norm.weight", depth) == 3
    groups = layer_decay_groups(backbone, head, lr=1.0, decay=0.5, weight_decay=0.05)
    lr_of = {id(p): g["lr"] for g in groups for p in g["params"]}
    wd_of = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    assert lr_of[id(head.weight)] == lr_of[id(backbone.norm.weight)] == 1.0
    assert lr_of[id(backbone.blocks[1].attn.qkv.weight)] == 0.5
    assert lr_of[id(backbone.blocks[0].attn.qkv.weight)] == 0.25
    assert lr_of[id(backbone.patch_embed.proj.weight)] == lr_of[id(backbone.pos_embed)] == 0.125
    assert wd_of[id(backbone.blocks[0].attn.qkv.weight)] == 0.05
    assert wd_of[id(backbone.blocks[0].attn.qkv.bias)] == wd_of[id(backbone.cls_token)] == 0.0
    assert sum(len(g["params"]) for g in groups) == len(list(backbone.parameters())) + 2


def test_a_short_schedule_learns_a_separable_task_and_leaves_the_input_unchanged():
    backbone = tiny_backbone()
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    g = torch.Generator().manual_seed(1)
    labels = torch.arange(3).repeat(40)
    colours = torch.tensor([[1.5, -1.5, -1.5], [-1.5, 1.5, -1.5], [-1.5, -1.5, 1.5]])
    images = colours[labels][:, :, None, None] + 0.3 * torch.randn(120, 3, 32, 32, generator=g)
    test = [{"image": colours[labels[:30]][:, :, None, None].expand(30, 3, 32, 32).clone(),
             "label": labels[:30]}]
    result = finetune(backbone, images, labels, test, 3, epochs=4, lr=2e-3, batch_size=16)
    assert result["top1"] >= 0.9 and result["steps"] == 4 * 8 and result["train_images"] == 120
    assert all(torch.equal(before[k], v) for k, v in backbone.state_dict().items())


def test_the_suite_runs_fine_tuning_by_name_only(tiny_checkpoint, synthetic_dir, tmp_path):
    assert "finetune" not in EvalOptions().suite
    options = EvalOptions(suite=["finetune"], finetune_epochs=1, finetune_max_train=40,
                          max_test_samples=20)
    ev = Evaluator.from_checkpoint(tiny_checkpoint, synthetic_dir, cache_dir=tmp_path,
                                   options=options)
    result = ev.finetune()
    assert result["train_images"] == 40 and result["epochs"] == 1
    pixels = Evaluator.for_baseline("pixels", ev.cfg, synthetic_dir, cache_dir=tmp_path,
                                    options=options)
    assert "skipped" in pixels.finetune()
    for bad in ({"finetune_epochs": 0}, {"finetune_lr": 0}, {"finetune_layer_decay": 1.5}):
        with pytest.raises(UserError, match=next(iter(bad))):
            EvalOptions(**bad).validate()


def test_one_step_trains_every_block_by_the_amount_its_layer_decay_gives():
    """The backbone trains (it did not: [CLS] features were computed under no_grad, so only
    the head moved), and block i moves decay^(depth - i) times the head's step: AdamW's first
    step is lr * sign(grad) per element, so the ratio of two blocks' median moves is the ratio
    of their learning rates."""
    backbone = tiny_backbone()
    g = torch.Generator().manual_seed(0)
    images, labels = torch.randn(16, 3, 32, 32, generator=g), torch.arange(16) % 3
    decay = 0.5
    tuned = train_finetune(backbone, images, labels, 3, epochs=1, lr=1e-3, layer_decay=decay,
                           weight_decay=0.0, batch_size=16)
    assert tuned.steps == 1
    moved = {}
    for name, after in tuned.model.named_parameters():
        if name == "mask_token":  # pretraining only: no input of fine-tuning is masked
            continue
        before = dict(backbone.named_parameters())[name]
        assert not torch.equal(before, after), f"{name} did not train"
        moved[name] = (after - before).abs()
    for i in range(len(backbone.blocks)):
        step = moved[f"blocks.{i}.mlp.fc1.weight"]
        lr = 1e-3 * decay ** (len(backbone.blocks) - i)
        assert step[step > 0].median().item() == pytest.approx(lr, rel=0.02)
    ratio = (moved["blocks.0.attn.qkv.weight"].median() / moved["blocks.1.attn.qkv.weight"].median())
    assert ratio.item() == pytest.approx(decay, rel=0.05)


def spatial_task(n: int, seed: int):
    """Labels set by which of two blobs lies above the other (red over green, or green over
    red, anywhere left or right): every image holds one red and one green blob, so a [CLS] that
    averages its patches (an untrained network's, attending about uniformly) cannot separate
    the classes linearly, and flips and crops keep the label."""
    g = torch.Generator().manual_seed(seed)
    images = 0.1 * torch.randn(n, 3, 32, 32, generator=g)
    labels = torch.randint(0, 2, (n,), generator=g)
    for i in range(n):
        top, gap = (int(v) for v in torch.randint(0, 6, (2,), generator=g))
        x1, x2 = (int(v) for v in torch.randint(0, 24, (2,), generator=g))
        upper, lower = (0, 1) if labels[i] == 0 else (1, 0)  # channel 0 red, 1 green
        images[i, upper, top:top + 8, x1:x1 + 8] += 2.0
        images[i, lower, top + 12 + gap:top + 20 + gap, x2:x2 + 8] += 2.0
    return images, labels


def test_fine_tuning_solves_a_spatial_task_that_the_frozen_network_cannot():
    from attmask.eval.linear import accuracy, train_probe

    backbone = tiny_backbone()
    train_x, train_y = spatial_task(512, 0)
    test_x, test_y = spatial_task(256, 1)
    with torch.no_grad():
        feats = backbone.eval().cls_features(train_x), backbone.cls_features(test_x)
    probe = train_probe(feats[0], train_y, 2, epochs=100, lr=0.5)
    frozen = accuracy(probe.model, feats[1], test_y)
    tuned = finetune(backbone, train_x, train_y, [{"image": test_x, "label": test_y}], 2,
                     epochs=8, lr=1e-3, layer_decay=0.9, weight_decay=0.0, batch_size=32)
    assert tuned["top1"] >= frozen + 0.2, (tuned["top1"], frozen)
