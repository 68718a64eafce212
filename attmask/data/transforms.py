"""Image transforms: DINO/iBOT multi-crop for pretraining, a single view for evaluation.

Photometric recipe of DINO (Caron et al., 2021) as used by iBOT and AttMask: flip, colour jitter
(0.4, 0.4, 0.2, 0.1) with p=0.8, grayscale p=0.2, Gaussian blur (p=1.0 on global crop 1, 0.1 on
global crop 2, 0.5 on local crops), solarisation p=0.2 on global crop 2 only, ImageNet
normalisation. Runs on uint8 tensors with torchvision's v2 transforms. Blur radius: the
official code draws sigma from U(0.1, 2) px for every crop size (``blur_sigma="official"``, the
paper presets); by default (``"scaled"``) that range is defined at 224 px and scaled with the crop
size, so the 16 px crops of the CPU presets are not erased. The colour distortion (jitter
strengths and the jitter and grayscale probabilities) is configurable: at 32 px it is what makes
two views of one image look least alike to an untrained network (studies/small-scale/README.md).
With ``colour_on="batch"`` the loader only crops and flips and draws each crop's colour
parameters; :mod:`attmask.data.colour` applies them to the whole batch in the training process.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Literal, Optional, cast

import torch
from torchvision.transforms import v2

from attmask.config import Config
from attmask.data.colour import ColourDraw, ColourRecipe, apply_colour

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _sigma_range(size: int, sigma: str) -> tuple[float, float]:
    scale = size / 224 if sigma == "scaled" else 1.0
    return 0.1 * scale, 2.0 * scale


def _kernel_size(sigma_range: tuple[float, float]) -> int:
    return 2 * max(1, round(3 * sigma_range[1])) + 1  # +-3 sigma of the widest draw


def _blur(size: int, p: float, sigma: str) -> v2.Transform:
    sigma_range = _sigma_range(size, sigma)
    return v2.RandomApply([v2.GaussianBlur(_kernel_size(sigma_range), sigma=sigma_range)], p=p)


def _finish() -> v2.Transform:
    return v2.Compose([v2.ToDtype(torch.float32, scale=True), v2.Normalize(MEAN, STD)])


DINO_JITTER = (0.4, 0.4, 0.2, 0.1)  # brightness, contrast, saturation, hue


def _photometric(jitter: tuple[float, ...] = DINO_JITTER, jitter_p: float = 0.8,
                 grayscale_p: float = 0.2) -> list[v2.Transform]:
    return [v2.RandomHorizontalFlip(),
            v2.RandomApply([v2.ColorJitter(*jitter)], p=jitter_p),
            v2.RandomGrayscale(p=grayscale_p)]


class MultiCropTransform:
    """uint8 (3, H, W) image -> (global crops list of 2, local crops list of ``local_number``).

    ``colour_on="image"``: each crop fully augmented and normalised here (torchvision, per
    crop). ``"batch"``: here only cropped and flipped (uint8), plus a third item, the crops'
    colour parameters (2 + ``local_number``, NUM_PARAMS), which :meth:`finish` applies to a
    batch at once."""

    def __init__(self, global_size: int = 224, local_size: int = 96,
                 global_scale: tuple[float, float] = (0.25, 1.0),
                 local_scale: tuple[float, float] = (0.05, 0.25), local_number: int = 6,
                 blur_sigma: str = "scaled", color_jitter: tuple[float, ...] = DINO_JITTER,
                 color_jitter_prob: float = 0.8, grayscale_prob: float = 0.2,
                 colour_on: Literal["image", "batch"] = "image", loader_workers: int = 0) -> None:
        crop = lambda size, scale: v2.RandomResizedCrop(  # noqa: E731
            size, scale=tuple(scale), interpolation=v2.InterpolationMode.BICUBIC, antialias=True)
        self.local_number, self.colour_on = local_number, colour_on
        self.loader_workers = loader_workers  # processes that hold CPU cores while finish runs
        if colour_on == "batch":
            recipe = lambda size, blur_p, solarize_p=0.0: ColourRecipe(  # noqa: E731
                cast(tuple[float, float, float, float], tuple(color_jitter)), color_jitter_prob, grayscale_prob, blur_p,
                _sigma_range(size, blur_sigma), solarize_p)
            self.draw_colour = ColourDraw([recipe(global_size, 1.0), recipe(global_size, 0.1, 0.2),
                                           *[recipe(local_size, 0.5)] * local_number])
            self.kernels = {s: _kernel_size(_sigma_range(s, blur_sigma))
                            for s in (global_size, local_size)}
            self.global1 = self.global2 = v2.Compose([crop(global_size, global_scale),
                                                      v2.RandomHorizontalFlip()])
            self.local = v2.Compose([crop(local_size, local_scale), v2.RandomHorizontalFlip()])
            return
        colour = lambda: _photometric(tuple(color_jitter), color_jitter_prob,  # noqa: E731
                                      grayscale_prob)
        self.global1 = v2.Compose([crop(global_size, global_scale), *colour(),
                                   _blur(global_size, 1.0, blur_sigma), _finish()])
        self.global2 = v2.Compose([crop(global_size, global_scale), *colour(),
                                   _blur(global_size, 0.1, blur_sigma), v2.RandomSolarize(128, p=0.2),
                                   _finish()])
        self.local = v2.Compose([crop(local_size, local_scale), *colour(),
                                 _blur(local_size, 0.5, blur_sigma), _finish()])

    def __call__(self, image: torch.Tensor) -> tuple:
        globals_ = [self.global1(image), self.global2(image)]
        locals_ = [self.local(image) for _ in range(self.local_number)]
        if self.colour_on == "image":
            return globals_, locals_
        return globals_, locals_, self.draw_colour()

    def finish(self, batch: dict, device: torch.device
               ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """A loader batch -> its (global, local) crops on ``device``, ready for the model."""
        global_, local = batch["global"].to(device, non_blocking=True), batch["local"]
        local = local.to(device, non_blocking=True) if local is not None else None
        if self.colour_on == "image":
            return global_, local
        # the colour half of the augmentation, on the whole batch, on the training device
        views = [global_] + ([local] if local is not None else [])
        params = batch["colour"].to(device).split([len(v) for v in views])
        normalise = v2.Normalize(MEAN, STD)
        with self._cpu_threads(device):
            out = [normalise(apply_colour(v.flatten(0, 1), p.flatten(0, 1),
                                          self.kernels[v.shape[-1]])).view(v.shape)
                   for v, p in zip(views, params)]
        return out[0], (out[1] if local is not None else None)

    @contextlib.contextmanager
    def _cpu_threads(self, device: torch.device) -> Iterator[None]:
        """On a CPU, the colour step's threads leave the loader workers their cores: threads
        that wait on a busy core cost more than they add (2 cores, 1 worker, 32 px: 125 ms per
        64-image batch on 2 threads, 30 on 1; docs/speed.md)."""
        threads = torch.get_num_threads()
        if device.type != "cpu" or threads <= 1 or not self.loader_workers:
            yield
            return
        torch.set_num_threads(max(1, threads - self.loader_workers))
        try:
            yield
        finally:
            torch.set_num_threads(threads)


def _stack_views(per_sample: list[list[torch.Tensor]]) -> Optional[torch.Tensor]:
    """[B][V] crops -> (V, B, 3, s, s)."""
    if not per_sample[0]:
        return None
    return torch.stack([torch.stack(views) for views in zip(*per_sample)])


def collate_views(per_sample: list[tuple]) -> dict:
    """B outputs of a :class:`MultiCropTransform` -> ``{"global": (2,B,..), "local": (L,B,..)
    or None}``, plus ``"colour": (2+L,B,P)`` where the transform leaves the colour to the batch."""
    out = {"global": _stack_views([v[0] for v in per_sample]),
           "local": _stack_views([v[1] for v in per_sample])}
    if len(per_sample[0]) == 3:
        out["colour"] = torch.stack([v[2] for v in per_sample], 1)
    return out


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
    return MultiCropTransform(m.image_size, m.local_image_size,
                              cast(tuple[float, float], tuple(d.global_crops_scale)),
                              cast(tuple[float, float], tuple(d.local_crops_scale)),
                              d.local_crops_number, d.blur_sigma,
                              tuple(d.color_jitter), d.color_jitter_prob, d.grayscale_prob,
                              d.colour_on, d.num_workers)
