"""Fine-tuning evaluation (attmask/eval/finetune.py): layer-wise LR decay and a short schedule."""
import pytest
import torch
from torch import nn

from attmask.errors import UserError
from attmask.eval.finetune import finetune, layer_decay_groups, layer_id
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
