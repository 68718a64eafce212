"""Image transforms: DINO/iBOT multi-crop for pretraining, a single view for evaluation.

Photometric recipe of DINO (Caron et al., 2021) as used by iBOT and AttMask: flip, colour jitter
(0.4, 0.4, 0.2, 0.1) with p=0.8, grayscale p=0.2, Gaussian blur (p=1.0 on global crop 1, 0.1 on
global crop 2, 0.5 on local crops), solarisation p=0.2 on global crop 2 only, ImageNet
normalisation. Runs on uint8 tensors with torchvision's v2 transforms. Blur radius: the
official code draws sigma from U(0.1, 2) px for every crop size (``blur_sigma="official"``, the
paper presets); by default (``"scaled"``) that range is defined at 224 px and scaled with the crop
size, so the 16 px crops of the CPU presets are not erased. The colour distortion (jitter
strengths and the jitter and grayscale probabilities) is configurable: at 32 px it is what makes
two views of one image look least alike to an untrained network (docs/small-scale.md).
"""
from __future__ import annotations

import torch
from torchvision.transforms import v2

from attmask.config import Config

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _blur(size: int, p: float, sigma: str) -> v2.Transform:
    scale = size / 224 if sigma == "scaled" else 1.0
    sigma_range = (0.1 * scale, 2.0 * scale)
    kernel = 2 * max(1, round(3 * sigma_range[1])) + 1  # +-3 sigma of the widest draw
    return v2.RandomApply([v2.GaussianBlur(kernel, sigma=sigma_range)], p=p)


def _finish() -> v2.Transform:
    return v2.Compose([v2.ToDtype(torch.float32, scale=True), v2.Normalize(MEAN, STD)])


DINO_JITTER = (0.4, 0.4, 0.2, 0.1)  # brightness, contrast, saturation, hue


def _photometric(jitter: tuple[float, ...] = DINO_JITTER, jitter_p: float = 0.8,
                 grayscale_p: float = 0.2) -> list[v2.Transform]:
    return [v2.RandomHorizontalFlip(),
            v2.RandomApply([v2.ColorJitter(*jitter)], p=jitter_p),
            v2.RandomGrayscale(p=grayscale_p)]


class MultiCropTransform:
    """uint8 (3, H, W) image -> (global crops list of 2, local crops list of ``local_number``)."""

    def __init__(self, global_size: int = 224, local_size: int = 96,
                 global_scale: tuple[float, float] = (0.25, 1.0),
                 local_scale: tuple[float, float] = (0.05, 0.25), local_number: int = 6,
                 blur_sigma: str = "scaled", color_jitter: tuple[float, ...] = DINO_JITTER,
                 color_jitter_prob: float = 0.8, grayscale_prob: float = 0.2) -> None:
        crop = lambda size, scale: v2.RandomResizedCrop(  # noqa: E731
            size, scale=tuple(scale), interpolation=v2.InterpolationMode.BICUBIC, antialias=True)
        colour = lambda: _photometric(tuple(color_jitter), color_jitter_prob,  # noqa: E731
                                      grayscale_prob)
        self.global1 = v2.Compose([crop(global_size, global_scale), *colour(),
                                   _blur(global_size, 1.0, blur_sigma), _finish()])
        self.global2 = v2.Compose([crop(global_size, global_scale), *colour(),
                                   _blur(global_size, 0.1, blur_sigma), v2.RandomSolarize(128, p=0.2),
                                   _finish()])
        self.local = v2.Compose([crop(local_size, local_scale), *colour(),
                                 _blur(local_size, 0.5, blur_sigma), _finish()])
        self.local_number = local_number

    def __call__(self, image: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        globals_ = [self.global1(image), self.global2(image)]
        return globals_, [self.local(image) for _ in range(self.local_number)]


class EvalTransform:
    """The evaluation view of the official k-NN and linear protocols (DINO ``eval_knn.py``):
    an image larger than ``size`` has its shorter side resized to ``size * 256 / 224`` (bicubic)
    and is centre-cropped to ``size``; an image no larger than ``size`` (CIFAR-10 at 32 px for a
    32 px model) is resized to ``size`` x ``size``. Then normalised. The foreground mask follows
    the same geometry with nearest-neighbour resizing."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.resize_to = int(size * 256 / 224)
        self.finish = _finish()

    def _geometry(self, image: torch.Tensor, mode: v2.InterpolationMode) -> torch.Tensor:
        antialias = mode != v2.InterpolationMode.NEAREST
        if min(image.shape[-2:]) <= self.size:
            return v2.functional.resize(image, [self.size, self.size], interpolation=mode,
                                        antialias=antialias)
        image = v2.functional.resize(image, self.resize_to, interpolation=mode,
                                     antialias=antialias)
        return v2.functional.center_crop(image, [self.size, self.size])

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        return self.finish(self._geometry(image, v2.InterpolationMode.BICUBIC))

    def mask(self, fg: torch.Tensor) -> torch.Tensor:
        return self._geometry(fg[None].to(torch.uint8), v2.InterpolationMode.NEAREST)[0].bool()


def pretraining_transform(cfg: Config) -> MultiCropTransform:
    """The multi-crop transform ``cfg`` describes."""
    m, d = cfg.model, cfg.data
    return MultiCropTransform(m.image_size, m.local_image_size, d.global_crops_scale,
                              d.local_crops_scale, d.local_crops_number, d.blur_sigma,
                              d.color_jitter, d.color_jitter_prob, d.grayscale_prob)
