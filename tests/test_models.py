import pytest
import timm
import torch

from attmask.models import IBOTHead, MaskedViT, MultiCropNet
from attmask.models.head import ROW_BUCKET
from attmask.models.vit import cls_attention


def small_vit(**kw):
    torch.manual_seed(0)
    return MaskedViT(img_size=32, patch_size=4, embed_dim=48, depth=3, num_heads=3,
                     qkv_bias=True, **kw).eval()


def explicit_cls_attention(model, images, layer):
    """Reference: the full softmax(QK^T / sqrt(d)) of one block, fused attention switched off."""
    captured = {}
    block = model.blocks[layer]
    block.attn.fused_attn = False
    handle = block.attn.attn_drop.register_forward_hook(lambda m, a, o: captured.update(a=o))
    try:
        model.forward_tokens(images)
    finally:
        handle.remove()
        block.attn.fused_attn = True
    return captured["a"][:, :, 0, 1:]  # (B, heads, patches): CLS query, CLS key dropped


@pytest.mark.parametrize("layer", [-1, 0, 1, -2])
@pytest.mark.parametrize("reduce", ["mean", "max"])
def test_cls_attention_matches_explicit_softmax(layer, reduce):
    model = small_vit()
    images = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        out = model.forward_tokens(images, attn_layer=layer, head_reduce=reduce)
        ref = explicit_cls_attention(model, images, layer)
    ref = ref.mean(1) if reduce == "mean" else ref.amax(1)
    assert out.attention.shape == (4, 64)
    assert (out.attention - ref).abs().max() < 1e-5
    assert all(b.attn.fused_attn for b in model.blocks)  # every block stays fused


def test_cls_attention_with_qk_norm_falls_back_to_explicit_keys():
    model = small_vit(qk_norm=True)
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out = model.forward_tokens(images, attn_layer=-1)
        ref = explicit_cls_attention(model, images, -1).mean(1)
    assert (out.attention - ref).abs().max() < 1e-5


def test_cls_attention_rejects_unknown_reduction():
    model = small_vit()
    with pytest.raises(ValueError, match="head_reduce"):
        cls_attention(model.blocks[0].attn, torch.randn(1, 65, 48), head_reduce="median")


def test_mask_token_replaces_patches_before_position_embedding():
    model = small_vit()
    with torch.no_grad():
        model.mask_token.normal_()
    all_masked = torch.ones(2, 64, dtype=torch.bool)
    a, b = torch.randn(2, 3, 32, 32), torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out_a = model.forward_tokens(a, mask=all_masked)
        out_b = model.forward_tokens(b, mask=all_masked)
        plain = model.forward_tokens(a)
    assert out_a.patches.shape == (2, 64, 48)  # sequence length unchanged
    assert torch.allclose(out_a.patches, out_b.patches, atol=1e-6)  # image content is gone
    # position embeddings are still added after the mask token: masked tokens differ by position
    assert (out_a.patches[0, 0] - out_a.patches[0, 1]).abs().max() > 1e-3
    assert not torch.allclose(out_a.patches, plain.patches)
    partial = torch.zeros(2, 64, dtype=torch.bool)
    partial[:, :5] = True
    with torch.no_grad():
        out_p = model.forward_tokens(a, mask=partial)
    assert not torch.allclose(out_p.cls, plain.cls)


def test_multi_resolution_inputs_interpolate_position_embeddings():
    model = small_vit()
    with torch.no_grad():
        local = model.forward_tokens(torch.randn(3, 3, 16, 16), attn_layer=-1)
        big = model.forward_tokens(torch.randn(1, 3, 64, 48))
    assert local.patches.shape == (3, 16, 48) and local.attention.shape == (3, 16)
    assert big.patches.shape == (1, 16 * 12, 48)
    with pytest.raises(AssertionError, match="divisible by patch size"):  # timm's own check
        model.forward_tokens(torch.randn(1, 3, 30, 30))


def test_backbone_weights_load_into_timm_with_matching_keys():
    model = small_vit()
    ref = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=4,
                            embed_dim=48, depth=3, num_heads=3, num_classes=0)
    ref.load_state_dict(model.backbone_state_dict(), strict=True)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(ref.forward_features(x)[:, 0], model.forward_tokens(x).cls, atol=1e-5)


def test_head_shared_and_unshared():
    shared = IBOTHead(48, 100, hidden_dim=32, bottleneck_dim=16)
    cls, patch = shared(torch.randn(4, 48), torch.randn(7, 48))
    assert cls.shape == (4, 100) and patch.shape == (7, 100)
    assert shared.patch_last_layer is None
    unshared = IBOTHead(48, 100, hidden_dim=32, bottleneck_dim=16, shared_head=False,
                        patch_out_dim=30)
    cls, patch = unshared(torch.randn(4, 48), torch.randn(7, 48))
    assert cls.shape == (4, 100) and patch.shape == (7, 30)
    assert unshared(torch.randn(4, 48))[1] is None


@pytest.mark.parametrize("shared", [True, False])
def test_head_pads_patch_rows_to_few_shapes_without_changing_a_real_row(shared):
    head = IBOTHead(48, 100, hidden_dim=32, bottleneck_dim=16, shared_head=shared,
                    patch_out_dim=100)
    rows, shapes = [], set()
    head.mlp.register_forward_hook(lambda m, a, o: rows.append(a[0].shape[0]))
    cls_tokens = torch.randn(4, 48)
    for n in range(0, 1000, 7):
        patches = torch.randn(n, 48)
        rows.clear()
        cls, patch = head(cls_tokens, patches)
        shapes.add(rows[0])
        assert cls.shape == (4, 100) and patch.shape == (n, 100)
        last = head.last_layer if shared else head.patch_last_layer
        if n:
            assert torch.allclose(patch, last(head.project(patches)), atol=1e-5)
        assert torch.allclose(cls, head.last_layer(head.project(cls_tokens)), atol=1e-5)
    # 143 masked-patch counts, 9 shapes (oneDNN caches kernels per shape)
    assert {r - 4 for r in shapes} == set(range(0, 1024 + 1, ROW_BUCKET))


def test_head_with_batch_norm_sees_no_padding_rows():
    head = IBOTHead(8, 10, hidden_dim=8, bottleneck_dim=4, batch_norm=True)
    rows = []
    head.mlp.register_forward_hook(lambda m, a, o: rows.append(a[0].shape[0]))
    head(torch.randn(4, 8), torch.randn(13, 8))
    assert rows == [4 + 13]  # padding would enter the batch statistics


def test_head_last_layer_weight_norm_gain_frozen_when_norm_last_layer():
    frozen = IBOTHead(8, 10, hidden_dim=8, bottleneck_dim=4, norm_last_layer=True)
    free = IBOTHead(8, 10, hidden_dim=8, bottleneck_dim=4, norm_last_layer=False)
    assert not frozen.last_layer.weight_g.requires_grad and free.last_layer.weight_g.requires_grad
    z = torch.nn.functional.normalize(torch.randn(3, 4), dim=-1)
    w = frozen.last_layer.weight_v / frozen.last_layer.weight_v.norm(dim=1, keepdim=True)
    assert torch.allclose(frozen.last_layer(z), z @ w.T, atol=1e-6)


def test_student_projects_only_masked_patches_and_local_cls():
    net = MultiCropNet(small_vit(), IBOTHead(48, 50, hidden_dim=32, bottleneck_dim=16))
    calls = []
    net.head.mlp.register_forward_hook(lambda m, a, o: calls.append(a[0].shape[0]))
    masks = torch.zeros(4, 64, dtype=torch.bool)
    masks[0, :10] = True
    masks[2, 5:8] = True
    cls, patch = net(torch.randn(4, 3, 32, 32), torch.randn(6, 3, 16, 16), masks)
    assert cls.shape == (10, 50)  # 4 global + 6 local [CLS] tokens
    assert patch.shape == (13, 50)  # only the 13 masked patches
    # one MLP pass, no local or unmasked patch tokens: the 13 masked ones padded to one bucket
    assert calls == [10 + ROW_BUCKET]


def test_head_batch_norm_spreads_nearly_identical_inputs():
    # A collapsing backbone hands the head almost the same vector for every image; with batch
    # norm (DINO's --use_bn_in_head) the bottleneck still tells the images apart.
    torch.manual_seed(0)
    x = torch.randn(1, 192) + 1e-3 * torch.randn(32, 192)
    spread = {}
    for bn in (False, True):
        head = IBOTHead(192, 64, hidden_dim=128, bottleneck_dim=32, batch_norm=bn)
        assert any(isinstance(m, torch.nn.BatchNorm1d) for m in head.mlp) == bn
        z = head.project(x)
        spread[bn] = (z @ z.T).mean().item()  # mean cosine between the images
    assert spread[False] > 0.999 and spread[True] < 0.5


def test_head_logits_are_fp32_under_bf16_autocast():
    head = IBOTHead(16, 64, hidden_dim=32, bottleneck_dim=8)
    x = torch.randn(4, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, _ = head(x)
    assert logits.dtype == torch.float32
    exact = head.last_layer(head.project(x).float())  # the same bottleneck, fp32 throughout
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z = head.project(x)
    assert torch.allclose(logits, head.last_layer(z), atol=0) and z.dtype == torch.bfloat16
    assert (logits - exact).abs().max() < 0.02  # only the bf16 MLP differs, not the last layer


def test_hmlp_stem_keeps_patches_independent_and_trains_end_to_end():
    from attmask.config import ModelConfig
    from attmask.models.vit import build_backbone

    cfg = ModelConfig(arch="vit_tiny", depth=2, image_size=32, local_image_size=16, patch_size=4,
                      stem="hmlp")
    torch.manual_seed(0)
    model = build_backbone(cfg).eval()
    assert isinstance(model.patch_embed.proj, torch.nn.Sequential)
    x = torch.randn(2, 3, 32, 32)
    y = x.clone()
    y[:, :, 4:8, 8:12] += 1.0  # one patch: row 1, column 2 of the 8 x 8 grid
    with torch.no_grad():
        ex, ey = model.patch_embed(x), model.patch_embed(y)  # (B, 8, 8, D)
    changed = (ex - ey).abs().amax(dim=(0, 3)) > 1e-6
    assert changed[1, 2] and changed.sum() == 1  # no other token sees that patch's pixels
    with torch.no_grad():  # local crops and masks work as with the linear stem
        out = model.forward_tokens(torch.randn(2, 3, 16, 16), mask=torch.rand(2, 16) > 0.5)
    assert out.patches.shape == (2, 16, 192)
    model.train()
    model.forward_tokens(x).cls.pow(2).sum().backward()  # (a plain sum after the norm is 0)
    assert model.patch_embed.proj[0].weight.grad.abs().sum() > 0
