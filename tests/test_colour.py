"""The batched colour augmentation (data.colour_on=batch) against torchvision's per-image one."""
import pytest
import torch
from torchvision.transforms.v2 import functional as F

from attmask.data import transforms
from attmask.data.colour import (
    BRIGHTNESS,
    CONTRAST,
    GRAY,
    HUE,
    JITTER,
    NUM_PARAMS,
    ORDER,
    SATURATION,
    SIGMA,
    SOLARIZE,
    ColourDraw,
    ColourRecipe,
    apply_colour,
)
from attmask.data.shards import load_dataset
from attmask.data.stream import TrainStream, make_loader, train_batches
from attmask.data.transforms import MEAN, STD, MultiCropTransform, pretraining_transform
from tests.conftest import tiny_config


def _torchvision(image: torch.Tensor, row: torch.Tensor, kernel: int) -> torch.Tensor:
    """One crop through torchvision's functional ops, in the order the row says."""
    ops = [lambda x: F.adjust_brightness(x, float(row[BRIGHTNESS])),
           lambda x: F.adjust_contrast(x, float(row[CONTRAST])),
           lambda x: F.adjust_saturation(x, float(row[SATURATION])),
           lambda x: F.adjust_hue(x, float(row[HUE]))]
    if row[JITTER]:
        for k in row[ORDER].long().tolist():
            image = ops[k](image)
    if row[GRAY]:
        image = F.rgb_to_grayscale(image, num_output_channels=3)
    if row[SIGMA] > 0:
        image = F.gaussian_blur(image, [kernel, kernel], [float(row[SIGMA])] * 2)
    if row[SOLARIZE]:
        image = F.solarize(image, 128 / 255)
    return image


@pytest.mark.parametrize("size, kernel", [(32, 3), (16, 3), (96, 7)])
def test_batched_colour_equals_torchvision_crop_by_crop(size, kernel):
    torch.manual_seed(0)
    images = torch.randint(0, 256, (48, 3, size, size), dtype=torch.uint8)
    # every operation likely, so each appears in every position of the jitter order
    draw = ColourDraw([ColourRecipe((0.4, 0.4, 0.2, 0.1), 0.9, 0.3, 0.6, (0.3, 1.5), 0.3)] * 48)
    params = draw()
    assert params[:, JITTER].sum() > 30 and 0 < params[:, GRAY].sum() < 48
    assert 0 < (params[:, SIGMA] > 0).sum() < 48 and 0 < params[:, SOLARIZE].sum() < 48
    batched = apply_colour(images, params, kernel)
    floats = images.float() / 255
    one_by_one = torch.stack([_torchvision(x, row, kernel) for x, row in zip(floats, params)])
    assert torch.allclose(batched, one_by_one, atol=1e-5)
    plain = torch.zeros(2, NUM_PARAMS)
    assert torch.equal(apply_colour(images[:2], plain, kernel), floats[:2])  # nothing drawn


def test_colour_draws_follow_the_recipe():
    recipes = [ColourRecipe(blur_p=1.0, sigma=(0.1, 2.0)),
               ColourRecipe(blur_p=0.1, sigma=(0.1, 2.0), solarize_p=0.2),
               ColourRecipe(jitter=(0.4, 0.0, 0.2, 0.1), jitter_p=0.5, grayscale_p=0.0,
                            blur_p=0.5, sigma=(0.05, 0.8))]
    torch.manual_seed(0)
    rows = torch.stack([ColourDraw(recipes)() for _ in range(8000)], 1)  # (3 views, 8000, P)
    rate = lambda x: float(x.float().mean())  # noqa: E731
    near = lambda x, p: abs(rate(x) - p) < 0.02  # noqa: E731
    assert near(rows[0, :, JITTER], 0.8) and near(rows[2, :, JITTER], 0.5)
    assert near(rows[0, :, GRAY], 0.2) and rate(rows[2, :, GRAY]) == 0
    assert rate(rows[0, :, SIGMA] > 0) == 1 and near(rows[1, :, SIGMA] > 0, 0.1)
    assert near(rows[2, :, SIGMA] > 0, 0.5)
    drawn = rows[2, :, SIGMA][rows[2, :, SIGMA] > 0]
    assert 0.05 <= drawn.min() < 0.1 and 0.75 < drawn.max() <= 0.8
    assert near(rows[1, :, SOLARIZE], 0.2) and rate(rows[0, :, SOLARIZE]) == 0
    bright = rows[0, :, BRIGHTNESS]
    assert 0.6 <= bright.min() < 0.62 and 1.38 < bright.max() <= 1.4
    assert torch.all(rows[2, :, CONTRAST] == 1)  # a strength of 0 leaves the image
    hue = rows[0, :, HUE]
    assert -0.1 <= hue.min() < -0.09 and 0.09 < hue.max() <= 0.1
    orders = rows[:, :, ORDER].reshape(-1, 4)
    assert torch.all(orders.sort(1).values == torch.arange(4.0))  # permutations
    assert near(orders[:, 0] == 3, 0.25)  # each operation first a quarter of the time


def test_batch_mode_batches_finish_to_the_engine_layout(synthetic_dir):
    ds = load_dataset(synthetic_dir)
    cfg = tiny_config(f"data.path={synthetic_dir}", "data.colour_on=batch",
                      "data.local_crops_number=3", "data.num_workers=0")
    b = cfg.train.batch_size_per_worker
    batch = next(iter(train_batches(ds, cfg, epoch=0, steps=1)))
    assert batch["global"].dtype == torch.uint8 and batch["colour"].shape == (5, b, NUM_PARAMS)
    global_, local = pretraining_transform(cfg).finish(batch, torch.device("cpu"))
    size, local_size = cfg.model.image_size, cfg.model.local_image_size
    assert global_.shape == (2, b, 3, size, size) and global_.dtype == torch.float32
    assert local.shape == (3, b, 3, local_size, local_size)
    # normalised as the per-image path: back in [0, 1] after undoing it
    mean, std = torch.tensor(MEAN).view(3, 1, 1), torch.tensor(STD).view(3, 1, 1)
    pixels = global_ * std + mean
    assert pixels.min() > -1e-5 and pixels.max() < 1 + 1e-5
    # view 1 is always blurred, view 2 only solarised, locals never
    colour = batch["colour"]
    assert torch.all(colour[0, :, SIGMA] > 0) and not colour[[0, 2, 3, 4], :, SOLARIZE].any()


def test_batch_mode_draws_the_same_crops_and_colours_on_resume(synthetic_dir):
    cfg = tiny_config(f"data.path={synthetic_dir}", "data.colour_on=batch", "data.num_workers=1")
    ds = load_dataset(synthetic_dir)
    straight = list(train_batches(ds, cfg, epoch=1, steps=4))
    torch.manual_seed(99)
    resumed = list(train_batches(ds, cfg, epoch=1, steps=4, skip=2))
    for a, b in zip(straight[2:], resumed):
        assert a["key"] == b["key"] and torch.equal(a["colour"], b["colour"])
        assert torch.equal(a["global"], b["global"]) and torch.equal(a["local"], b["local"])


def test_image_mode_batches_carry_no_colour_parameters(synthetic_dir):
    stream = TrainStream(load_dataset(synthetic_dir), "train",
                         MultiCropTransform(32, 16, local_number=1), 4)
    batch = next(iter(make_loader(stream, 0)))
    assert "colour" not in batch and batch["global"].dtype == torch.float32


def test_finish_on_cpu_leaves_the_loader_workers_their_cores(synthetic_dir, monkeypatch):
    cfg = tiny_config(f"data.path={synthetic_dir}", "data.colour_on=batch", "data.num_workers=0")
    batch = next(iter(train_batches(load_dataset(synthetic_dir), cfg, epoch=0, steps=1)))
    transform = lambda workers: MultiCropTransform(  # noqa: E731
        32, 16, local_number=cfg.data.local_crops_number, colour_on="batch",
        loader_workers=workers)
    alone = transform(0).finish(batch, torch.device("cpu"))
    threads, seen = torch.get_num_threads(), []
    def counting(*args):
        seen.append(torch.get_num_threads())
        return apply_colour(*args)
    monkeypatch.setattr(transforms, "apply_colour", counting)
    shared = transform(1).finish(batch, torch.device("cpu"))
    assert seen and all(n == max(1, threads - 1) for n in seen)
    assert torch.get_num_threads() == threads  # restored afterwards
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(alone, shared))
