"""DINO's colour augmentation applied to a whole batch at once (``data.colour_on=batch``).

The per-image path (:class:`attmask.data.transforms.MultiCropTransform` with ``colour_on="image"``)
runs torchvision's transforms one crop at a time in the loader workers; at 32 px their fixed cost
per call, not the pixels, is most of a CPU step (docs/speed.md). Here the loader only crops and
flips, and draws each crop's colour parameters from the same per-sample random stream; the
training process then applies them to every crop of a view in a few batched tensor operations,
on its own device. The distributions are DINO's (Caron et al., 2021): colour jitter in a random
order of brightness, contrast, saturation and hue with probability ``jitter_p``, grayscale with
``grayscale_p``, Gaussian blur with a per-view probability and sigma range, solarisation. The
operations are torchvision's on float images (tests/test_colour.py checks them against it),
without the per-operation rounding to uint8 of the per-image path.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torchvision.transforms.v2 import functional as F

# torchvision's own RGB <-> HSV conversion (what its adjust_hue uses); it is elementwise, so it
# takes a batch, where adjust_hue takes a single hue factor. The test against adjust_hue guards it.
from torchvision.transforms.v2.functional._color import _hsv_to_rgb, _rgb_to_hsv

# Columns of a crop's parameter row.
JITTER, BRIGHTNESS, CONTRAST, SATURATION, HUE = 0, 1, 2, 3, 4
ORDER = slice(5, 9)  # the jitter's operation order: a permutation of 0..3 (brightness..hue)
GRAY, SIGMA, SOLARIZE = 9, 10, 11  # SIGMA 0: no blur
NUM_PARAMS = 12


@dataclass(frozen=True)
class ColourRecipe:
    """What one view's colour augmentation draws from."""
    jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.2, 0.1)
    jitter_p: float = 0.8
    grayscale_p: float = 0.2
    blur_p: float = 0.5
    sigma: tuple[float, float] = (0.1, 2.0)
    solarize_p: float = 0.0


class ColourDraw:
    """Draws one image's colour parameters: a row per view, view i from ``recipes[i]``, all
    from torch's global random state (the training stream forks it per sample)."""

    def __init__(self, recipes: list[ColourRecipe]) -> None:
        column = lambda f: torch.tensor([f(r) for r in recipes], dtype=torch.float32)  # noqa: E731
        strength = torch.tensor([r.jitter for r in recipes], dtype=torch.float32).view(-1, 4)
        # factors as torchvision's ColorJitter draws them: U(max(0, 1 - x), 1 + x), hue U(-x, x)
        self.low = torch.cat([(1 - strength[:, :3]).clamp(min=0), -strength[:, 3:]], 1)
        self.high = torch.cat([1 + strength[:, :3], strength[:, 3:]], 1)
        self.jitter_p, self.grayscale_p = column(lambda r: r.jitter_p), column(lambda r: r.grayscale_p)
        self.blur_p, self.solarize_p = column(lambda r: r.blur_p), column(lambda r: r.solarize_p)
        self.sigma_low, self.sigma_high = column(lambda r: r.sigma[0]), column(lambda r: r.sigma[1])

    def __call__(self) -> torch.Tensor:
        views = len(self.low)
        u = torch.rand(views, 9)
        rows = torch.empty(views, NUM_PARAMS)
        rows[:, JITTER] = (u[:, 0] < self.jitter_p).float()
        rows[:, BRIGHTNESS:HUE + 1] = self.low + (self.high - self.low) * u[:, 1:5]
        rows[:, ORDER] = torch.rand(views, 4).argsort(1).float()  # a uniform permutation
        rows[:, GRAY] = (u[:, 5] < self.grayscale_p).float()
        sigma = self.sigma_low + (self.sigma_high - self.sigma_low) * u[:, 7]
        rows[:, SIGMA] = torch.where(u[:, 6] < self.blur_p, sigma, torch.zeros(()))
        rows[:, SOLARIZE] = (u[:, 8] < self.solarize_p).float()
        return rows


def _blend(x: torch.Tensor, other: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    f = factor.view(-1, 1, 1, 1)
    return (f * x + (1.0 - f) * other).clamp_(0.0, 1.0)


def _brightness(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    return _blend(x, torch.zeros_like(x), f)


def _contrast(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    mean = F.rgb_to_grayscale(x).mean(dim=(-3, -2, -1), keepdim=True)
    return _blend(x, mean, f)


def _saturation(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    return _blend(x, F.rgb_to_grayscale(x), f)


def _hue(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    h, s, v = _rgb_to_hsv(x).unbind(dim=-3)
    h = (h + f.view(-1, 1, 1)).remainder(1.0)
    return _hsv_to_rgb(torch.stack((h, s, v), dim=-3))


_JITTER_OPS = ((_brightness, BRIGHTNESS), (_contrast, CONTRAST), (_saturation, SATURATION),
               (_hue, HUE))


def _blur(x: torch.Tensor, sigma: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """torchvision's gaussian_blur (reflect padding) with one sigma per image, as two 1-D
    passes of a grouped convolution over all images' channels."""
    n, c, height, width = x.shape
    half = (kernel_size - 1) * 0.5
    pos = torch.linspace(-half, half, kernel_size, device=x.device, dtype=x.dtype)
    pdf = torch.exp(-0.5 * (pos[None] / sigma[:, None]) ** 2)
    kernel = (pdf / pdf.sum(1, keepdim=True)).repeat_interleave(c, dim=0)  # (n*c, k)
    pad = kernel_size // 2
    y = torch.nn.functional.pad(x, [pad] * 4, mode="reflect").reshape(1, n * c, height + 2 * pad,
                                                                      width + 2 * pad)
    y = torch.nn.functional.conv2d(y, kernel[:, None, None, :], groups=n * c)  # along rows
    y = torch.nn.functional.conv2d(y, kernel[:, None, :, None], groups=n * c)  # along columns
    return y.reshape(n, c, height, width)


def apply_colour(images: torch.Tensor, params: torch.Tensor, blur_kernel: int) -> torch.Tensor:
    """uint8 or float [0, 1] crops (N, 3, H, W) and their parameter rows (N, NUM_PARAMS) ->
    float crops in [0, 1]: jitter (in each crop's order), grayscale, blur, solarisation."""
    x = images.float() / 255.0 if not images.is_floating_point() else images.clone()
    params = params.to(x.device)
    jitter = params[:, JITTER] > 0
    order = params[:, ORDER].long()
    for position in range(4):  # each crop's position-th operation, crops grouped by operation
        for k, (op, col) in enumerate(_JITTER_OPS):
            idx = (jitter & (order[:, position] == k)).nonzero().squeeze(1)
            if len(idx):
                x[idx] = op(x[idx], params[idx, col])
    gray = (params[:, GRAY] > 0).nonzero().squeeze(1)
    if len(gray):
        x[gray] = F.rgb_to_grayscale(x[gray], num_output_channels=3)
    blurred = (params[:, SIGMA] > 0).nonzero().squeeze(1)
    if len(blurred):
        x[blurred] = _blur(x[blurred], params[blurred, SIGMA], blur_kernel)
    solar = (params[:, SOLARIZE] > 0).nonzero().squeeze(1)
    if len(solar):
        # torchvision's RandomSolarize(128) on uint8: pixels >= 128 are inverted
        x[solar] = torch.where(x[solar] >= 128 / 255, 1.0 - x[solar], x[solar])
    return x
