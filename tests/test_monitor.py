"""The online k-NN monitor (attmask/monitor.py) and the pictures (attmask/viz.py), directly."""
import io

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from attmask.data.prepare import PrepareArgs, prepare_data
from attmask.data.shards import load_dataset
from attmask.models.vit import build_backbone
from attmask.monitor import OnlineKnn
from attmask.viz import attention_and_masks, confusion_png, line_chart_png, mask_grid_png, series_styles
from conftest import tiny_config

COLOURS = np.array([[230, 20, 20], [20, 230, 20], [20, 20, 230]], np.uint8)


@pytest.fixture(scope="module")
def colour_data(tmp_path_factory):
    """Three classes, each a solid colour plus noise: its mean colour names the class."""
    src, out = tmp_path_factory.mktemp("src"), tmp_path_factory.mktemp("colours")
    rng = np.random.default_rng(0)
    for split, n in (("train", 60), ("test", 30)):
        labels = np.arange(n) % 3
        noise = rng.integers(-15, 16, (n, 32, 32, 3))
        images = np.clip(COLOURS[labels][:, None, None, :] + noise, 0, 255).astype(np.uint8)
        np.savez(src / f"{split}.npz", images=images, labels=labels)
    prepare_data(PrepareArgs(source="npz", from_path=str(src), out=str(out), val_per_class=5))
    return load_dataset(out)


class MeanColour(nn.Module):
    """A stand-in backbone whose [CLS] feature is the image's mean colour (or, ``noise=True``,
    a feature unrelated to the image)."""

    def __init__(self, noise: bool = False):
        super().__init__()
        self.unused = nn.Parameter(torch.zeros(1))
        self.noise = torch.Generator().manual_seed(0) if noise else None

    def cls_features(self, images, n_last_blocks=1):
        if self.noise is not None:
            return torch.randn(len(images), 8, generator=self.noise)
        return images.mean(dim=(2, 3))


def test_monitor_scores_separable_features_perfectly_on_a_fixed_stratified_subset(colour_data):
    cfg = tiny_config("train.knn_train_samples=30", "train.knn_test_samples=12",
                      "train.knn_every_epochs=2", "train.epochs=5")
    monitor = OnlineKnn(colour_data, cfg)
    assert [monitor.due(e) for e in range(5)] == [False, True, False, True, True]
    assert monitor(MeanColour())["knn_top1"] == 1.0
    keys = dict(monitor._keys)
    assert len(keys["train"]) == 30 and len(keys["val"]) == 12
    unrelated = monitor(MeanColour(noise=True))
    assert monitor._keys == keys  # the same images at every call
    assert unrelated["knn_top1"] < 0.7  # features unrelated to the image: near chance (1/3)
    off = OnlineKnn(colour_data, tiny_config("train.knn_every_epochs=0"))
    assert not off.available and not off.due(0)


def _png_size(png: bytes) -> tuple[int, int]:
    assert png.startswith(b"\x89PNG")
    return Image.open(io.BytesIO(png)).size


def test_attention_masks_and_pictures():
    cfg = tiny_config()
    torch.manual_seed(0)
    backbone = build_backbone(cfg.model).eval()
    images = torch.randn(3, 3, 32, 32)
    attn, masks = attention_and_masks(backbone, images, 4, ("random", "attmask_high"))
    # [CLS] -> patch attention: the [CLS]-to-itself share is left out, so each sums below 1
    assert attn.shape == (3, 8, 8) and (attn >= 0).all() and (attn.sum((1, 2)) < 1).all()
    for mask in masks.values():
        assert mask.shape == (3, 8, 8) and (mask.sum((1, 2)) == 19).all()  # floor(64 * 0.3)
    top = attn.flatten(1).topk(19).indices
    assert masks["attmask_high"].flatten(1).gather(1, top).all()  # the most attended, hidden
    w, h = _png_size(mask_grid_png(images, attn, masks, "title"))
    assert h > 0 and w > h  # one row per image, 2 + 2 columns
    assert min(_png_size(confusion_png(torch.eye(3) * 5, ["a", "b", "c"]))) > 100
    assert min(_png_size(line_chart_png({"random": [(1, 0.2), (2, 0.3)]}, "t", "epoch", "k-NN"))) > 100
    # a study plot (many trials, several reference lines) puts its legend beside the axes
    many = {f"trial {i}": [(0, 0.2), (1, 0.2 + i / 100)] for i in range(12)}
    wide = _png_size(line_chart_png(many, "t", "min", "k-NN", {f"init {i}": 0.2 for i in range(5)}))
    assert wide[0] > 1.4 * _png_size(line_chart_png({"a": [(0, 0.2)]}, "t", "min", "k-NN"))[0]
    # more series than the palette has colours: none looks like another
    styles = series_styles(25, [f"colour {i}" for i in range(20)])
    assert len(set(styles)) == 25
    assert styles[0][0] == styles[20][0] and styles[0][1:] != styles[20][1:]
