"""Evaluation protocols on inputs with known answers, and the suite's input checks."""
import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from attmask.errors import DataError, UserError
from attmask.eval.attention import attention_on_object, patch_foreground
from attmask.eval.fewshot import disjoint_splits, fewshot_knn
from attmask.eval.knn import knn_accuracy, knn_classify
from attmask.eval.linear import carve_validation, train_probe
from attmask.eval.results import decode_hits, encode_hits
from attmask.eval.suite import EvalOptions, Evaluator, load_teacher
from attmask.models import MaskedViT
from conftest import tiny_config

CENTERS = torch.randn(4, 16, generator=torch.Generator().manual_seed(0)) * 3


def clusters(n_per_class=40, noise=0.05, seed=0):
    """Points around 4 fixed class centres; ``seed`` draws the noise."""
    g = torch.Generator().manual_seed(seed + 1)
    labels = torch.arange(4).repeat_interleave(n_per_class)
    return CENTERS[labels] + noise * torch.randn(len(labels), 16, generator=g), labels


def test_knn_separable_is_perfect_and_shuffled_is_chance():
    x, y = clusters()
    x_test, y_test = clusters(n_per_class=20, seed=1)
    acc = knn_accuracy(x, y, x_test, y_test, 4, ks=(10, 20))
    assert acc["k20"]["top1"] == 1.0 and acc["k10"]["top5"] == 1.0
    assert acc["k20"]["n"] == len(y_test) == 80  # the test count travels with the accuracy
    g = torch.Generator().manual_seed(3)  # labels unrelated to the features: chance level
    bank, labels = torch.randn(800, 16, generator=g), torch.randint(0, 4, (800,), generator=g)
    queries, truth = torch.randn(800, 16, generator=g), torch.randint(0, 4, (800,), generator=g)
    chance = knn_accuracy(bank, labels, queries, truth, 4, ks=(20,))["k20"]["top1"]
    assert 0.18 < chance < 0.32


def test_knn_keeps_which_test_images_it_got_right():
    g = torch.Generator().manual_seed(3)
    bank, labels = torch.randn(800, 16, generator=g), torch.randint(0, 4, (800,), generator=g)
    queries, truth = torch.randn(77, 16, generator=g), torch.randint(0, 4, (77,), generator=g)
    keys = [f"img{i:03d}" for i in range(77)]
    acc = knn_accuracy(bank, labels, queries, truth, 4, ks=(10, 20), test_keys=keys)
    assert "hits" not in acc["k10"]  # only the headline k is kept
    hits, digest = decode_hits(acc["k20"])
    assert hits.dtype == bool and len(hits) == 77 and 0 < hits.sum() < 77
    assert hits.mean() == pytest.approx(acc["k20"]["top1"])
    scores = knn_classify(bank, labels, queries, 4, k=20)
    assert np.array_equal(hits, (scores.argmax(1) == truth).numpy())
    # the digest names the test images and their order: reordered keys do not pair
    assert encode_hits(hits, keys)["images"] == digest
    assert encode_hits(hits, keys[::-1])["images"] != digest
    assert decode_hits(knn_accuracy(bank, labels, queries, truth, 4, ks=(20,))["k20"]) is None
    with pytest.raises(ValueError, match="77 hits for 76 test images"):
        encode_hits(hits, keys[:-1])


def test_knn_chunking_and_k_capped_at_bank():
    x, y = clusters()
    q = torch.randn(50, 16)
    assert torch.allclose(knn_classify(x, y, q, 4, chunk=7), knn_classify(x, y, q, 4, chunk=1024))
    small = knn_classify(x[:5], y[:5], q, 4, k=200)
    assert small.shape == (50, 4)


def test_fewshot_splits_are_disjoint_and_sized():
    _, y = clusters(n_per_class=30)
    splits = disjoint_splits(y, nu=5, num_splits=5)
    flat = torch.cat(splits)
    assert len(flat) == len(flat.unique()) == 5 * 5 * 4
    for s in splits:
        assert torch.equal(torch.bincount(y[s]), torch.full((4,), 5))
    with pytest.raises(ValueError, match="class 0 has 30 images"):
        disjoint_splits(y, nu=10, num_splits=5)


def test_fewshot_reports_mean_std_and_skips_what_the_data_cannot_serve():
    x, y = clusters(n_per_class=30)
    x_test, y_test = clusters(n_per_class=10, seed=1)
    out = fewshot_knn(x, y, x_test, y_test, 4, shots=(1, 5, 10))
    assert out["1"]["mean"] == 1.0 and out["1"]["splits"] == 5 and out["1"]["k"] == 1
    assert out["5"]["k"] == 20 and out["5"]["std"] == 0.0
    assert "skipped" in out["10"] and "need 50" in out["10"]["skipped"]


def test_linear_probe_selects_on_validation_and_learns_separable_data():
    x, y = clusters(noise=0.5)
    train, val = carve_validation(y, 0.25)
    assert not set(train.tolist()) & set(val.tolist())
    assert torch.equal(torch.bincount(y[val]), torch.full((4,), 10))
    probe = train_probe(x, y, 4, epochs=20, lr=0.1)
    assert probe.val_top1 == 1.0 and 1 <= probe.epoch <= 20
    x_test, y_test = clusters(n_per_class=10, noise=0.5, seed=1)
    assert (probe.model(x_test).argmax(1) == y_test).float().mean() == 1.0


def test_patch_foreground_and_attention_on_object():
    fg = torch.zeros(2, 32, 32, dtype=torch.bool)
    fg[:, :8, :8] = True  # the top-left 2x2 patches of 4 px
    on = patch_foreground(fg, 4)
    assert on.shape == (2, 64) and on.sum() == 8
    model = MaskedViT(img_size=32, patch_size=4, embed_dim=48, depth=2, num_heads=3)
    batch = {"image": torch.randn(2, 3, 32, 32), "fg": fg, "label": torch.zeros(2)}
    out = attention_on_object(model, [batch], 4)
    assert out["object_share"] == pytest.approx(4 / 64)
    # recomputed from the attention itself: of the 6 (10 % of 64) and the 19 (30 %) most
    # attended patches of each image, the share inside the 4-patch object
    with torch.no_grad():
        attn = model.forward_tokens(batch["image"], attn_layer=-1).attention
    hits = lambda k: float(on.gather(1, attn.topk(k, dim=1).indices).sum()) / (2 * k)  # noqa: E731
    assert out["topk_on_object"] == pytest.approx(hits(6))
    assert out["masked_on_object"] == pytest.approx(hits(19))
    # the shares are of the object: an image that is all object (or none) gives 1 (or 0)
    for value in (True, False):
        batch["fg"] = torch.full((2, 32, 32), value)
        out = attention_on_object(model, [batch], 4)
        assert out["topk_on_object"] == out["masked_on_object"] == out["object_share"] == value


def test_wrong_architecture_or_missing_keys_are_errors(tiny_checkpoint, tmp_path):
    backbone, cfg = load_teacher(tiny_checkpoint)
    assert cfg.model.depth == 2
    state = backbone.backbone_state_dict()
    with pytest.raises(UserError, match="does not fit model vit_tiny.*shape mismatch"):
        path = tmp_path / "b.safetensors"
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
        load_teacher(path, tiny_config("model.patch_size=8"))
    del state["blocks.1.mlp.fc2.weight"]
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "m.safetensors"))
    with pytest.raises(UserError, match="missing keys: blocks.1.mlp.fc2.weight"):
        load_teacher(tmp_path / "m.safetensors", tiny_config())
    with pytest.raises(UserError, match="needs --config"):
        load_teacher(tmp_path / "m.safetensors")
    with pytest.raises(UserError, match="checkpoint not found"):
        load_teacher(tmp_path / "nope.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="cannot be loaded"):
        load_teacher(tmp_path / "junk.pt")


def test_suite_on_synthetic_with_all_variants(tiny_checkpoint, synthetic_dir, tmp_path):
    opts = EvalOptions(probe_epochs=5, shots=(1, 5))
    ev = Evaluator.from_checkpoint(tiny_checkpoint, synthetic_dir, cache_dir=tmp_path / "cache",
                                   options=opts)
    ev.prefetch()
    cached = len(list((tmp_path / "cache").glob("*.pt")))
    assert cached == 7  # train, test and five variants, each extracted once
    robustness = ev.robustness()
    assert set(robustness["variants"]) == {"original", "only_fg", "only_bg", "mixed_same",
                                           "mixed_rand"}
    assert robustness["bg_gap"] == pytest.approx(robustness["variants"]["mixed_same"]
                                                 - robustness["variants"]["mixed_rand"])
    knn = ev.knn()
    assert set(knn) == {"k10", "k20", "k100", "k200"}
    hits, _ = decode_hits(knn["k20"])  # per test image, for comparing two models image by image
    assert len(hits) == knn["k20"]["n"] and hits.mean() == pytest.approx(knn["k20"]["top1"])
    linear, cm = ev.linear()
    # the tiny model has 2 blocks: "last 4 blocks" are both of them, sliced per block
    assert cm.sum() == 32 and linear["n_last_blocks"] == 2
    assert linear["top1"] == pytest.approx(float(cm.diagonal().sum() / cm.sum()))
    assert ev.features("train", 4).features.shape[1] == 2 * ev.features("train", 1).features.shape[1]
    assert torch.equal(ev.features("train", 4).features[:, -192:], ev.features("train", 1).features)
    assert "skipped" in ev.fewshot()["5"]  # 160 train images cannot give 5 x 5 per class
    attention = ev.attention()
    assert attention["top_fraction"] == 0.1 and attention["mask_ratio"] == pytest.approx(
        sum(ev.cfg.masking.ratio) / 2)  # the midpoint of the configured range
    assert 0 < attention["object_share"] < 1
    ev.prefetch()
    assert len(list((tmp_path / "cache").glob("*.pt"))) == cached  # cache reused


def test_attention_cap_leaves_the_test_split_whole(tiny_checkpoint, synthetic_dir, tmp_path):
    """A large test split for the k-NN, without attention maps of its size."""
    def evaluator(**caps) -> Evaluator:
        return Evaluator.from_checkpoint(tiny_checkpoint, synthetic_dir, cache_dir=tmp_path / "c",
                                         options=EvalOptions(probe_epochs=2, **caps))

    ev = evaluator(max_attention_samples=12)
    assert len(ev.features("test", 1).labels) == 32  # the k-NN's test split stays whole
    whole, capped = evaluator().attention(), ev.attention()
    assert capped["object_share"] != whole["object_share"]  # fewer images were read
    assert evaluator(max_test_samples=12).attention() == capped  # by default, max_test's cap
    with pytest.raises(UserError, match="max_attention=0"):
        evaluator(max_attention_samples=0)


def test_external_robustness_set_and_data_checks(tiny_checkpoint, synthetic_dir, tmp_path):
    rob = tmp_path / "rob"
    rob.mkdir()
    rng = np.random.default_rng(0)
    for name, n in (("train_original", 40), ("test_mixed_rand", 12), ("test_only_fg", 12)):
        np.savez(rob / f"{name}.npz", images=rng.integers(0, 255, (n, 48, 48, 3), dtype=np.uint8),
                 labels=np.arange(n) % 10)
    ev = Evaluator.from_checkpoint(tiny_checkpoint, synthetic_dir, cache_dir=tmp_path / "c",
                                   robustness_set=rob, options=EvalOptions(probe_epochs=3))
    assert set(ev.robustness()["variants"]) == {"mixed_rand", "only_fg"}
    np.savez(rob / "train_original.npz", images=np.zeros((4, 8, 8, 3), np.uint8),
             labels=np.array([0, 1, 2, 30]))
    with pytest.raises(DataError, match="labels up to 30 do not fit the 10 classes"):
        Evaluator.from_checkpoint(tiny_checkpoint, synthetic_dir, cache_dir=tmp_path / "c",
                                  robustness_set=rob)
    with pytest.raises(UserError, match="--suite"):
        Evaluator.from_checkpoint(tiny_checkpoint, synthetic_dir, cache_dir=tmp_path / "c",
                                  options=EvalOptions(suite=["knn", "bogus"]))
    manifest = json.loads((synthetic_dir / "dataset.json").read_text())
    small = tmp_path / "small"
    small.mkdir()
    manifest["image_size"] = 16
    (small / "dataset.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match="smaller than the model input 32 px"):
        Evaluator.from_checkpoint(tiny_checkpoint, small, cache_dir=tmp_path / "c")


def test_the_official_linear_protocol_sweeps_lrs_on_augmented_crops_and_chooses_on_val(
        tiny_checkpoint, synthetic_dir, tmp_path):
    """evaluate --linear-protocol official: DINO's augmented-crop probe with iBOT's LR sweep,
    the LR and epoch chosen on the held-out val split, the test split scored once."""
    from attmask.eval.linear import OFFICIAL_LRS
    from attmask.eval.suite import EvalOptions, Evaluator

    options = EvalOptions(suite=["linear"], probe_epochs=2, linear_protocol="official")
    ev = Evaluator.from_checkpoint(tiny_checkpoint, synthetic_dir, cache_dir=tmp_path,
                                   options=options)
    result, _ = ev.linear()
    val = ev.features("val", 4)
    assert result["protocol"] == "official" and result["lr"] in OFFICIAL_LRS
    assert 1 <= result["epoch"] <= 2 and 0 <= result["top1"] <= 1
    # its val score is a count of the val split's images
    assert round(result["val_top1"] * len(val.labels), 6).is_integer()
    with pytest.raises(UserError, match="--linear-protocol"):
        EvalOptions(linear_protocol="paper").validate()
