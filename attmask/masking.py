"""Masking strategies for masked image modeling, by name.

AttMask (Kakogeorgiou et al., "What to Hide from Your Students: Attention-Guided Masked Image
Modeling", ECCV 2022) ranks patches by the teacher's [CLS] attention and hides the most attended
ones (``attmask_high``), the least attended (``attmask_low``), or the most attended minus a few
revealed hints (``attmask_hint``). ``random`` and ``block`` are the iBOT/BEiT baselines.

Every masker has one signature, ``masker(scores, grid, generator=None, *, batch_size=None,
device=None) -> BoolTensor[B, H*W]`` (True = hidden), works on the whole batch at once on the
scores' device and is deterministic under a ``torch.Generator``. ``random`` and ``block`` ignore
``scores``; with ``scores=None`` they take the batch size from ``batch_size=`` (or from the
``batch_size`` given to :func:`make_masker`).

Shared semantics (all strategies, so that they hide the same share of patches at equal settings):
per image a ratio ``r ~ U(ratio)`` (``ratio_per="batch"``: one draw per batch, as the official
AttMask code), ``n = floor(H*W*r)``, and with probability ``1 - prob`` an image is not masked at
all. Unlike the official code, ``prob`` applies to ``random`` and ``block`` too. A strategy's own
parameters (``show_max`` and ``num_hints`` of ``attmask_hint``, ``aspect`` ... of ``block``) are
keyword arguments of its class; :func:`parameters` lists what each one takes.
"""
from __future__ import annotations

import inspect
import math
from typing import Any, Callable, Optional, TypeVar

import torch

Grid = tuple[int, int]
_REGISTRY: dict[str, type["Masker"]] = {}


M = TypeVar("M", bound=type["Masker"])


def register(name: str) -> Callable[[M], M]:
    """Class decorator: make a :class:`Masker` subclass buildable by ``name``."""
    def wrap(cls: M) -> M:
        if name in _REGISTRY:
            raise ValueError(f"masking strategy {name!r} is registered already "
                             f"({_REGISTRY[name].__name__})")
        _REGISTRY[name] = cls
        return cls
    return wrap


def available() -> list[str]:
    """Names accepted by :func:`make_masker`."""
    return list(_REGISTRY)


def masker_class(name: str) -> type["Masker"]:
    return _REGISTRY[name]


def parameters(name: str, own: bool = False) -> dict[str, Any]:
    """Keyword parameters of strategy ``name`` and their defaults; ``own=True``: only those its
    class adds to the shared ones of :class:`Masker`."""
    found: dict[str, Any] = {}
    for cls in _REGISTRY[name].__mro__:
        if own and cls is Masker:
            break
        if "__init__" in vars(cls):
            init = vars(cls)["__init__"]
            found |= {p.name: p.default for p in inspect.signature(init).parameters.values()
                      if p.kind is p.KEYWORD_ONLY and p.name not in found}
    return found


def make_masker(name: str, **params: Any) -> "Masker":
    """Build a masker by name from the parameters its class takes; bad names, unknown parameters
    and bad values raise ``ValueError`` naming the parameter."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown masking strategy {name!r}; available: {', '.join(available())}")
    accepted = parameters(name)
    for key in params:
        if key not in accepted:
            raise ValueError(f"{key}: {name} takes no such parameter; it takes "
                             f"{', '.join(accepted)}")
    return _REGISTRY[name](**params)


class Masker:
    """Base class: draws the per-image ratio and the keep/drop decision; subclasses pick patches."""

    needs_scores = False

    def __init__(self, *, ratio: tuple[float, float] = (0.1, 0.5), prob: float = 0.5,
                 ratio_per: str = "image", batch_size: Optional[int] = None) -> None:
        ratio = tuple(float(r) for r in ratio)  # type: ignore[assignment]  # checked next
        if len(ratio) != 2 or not 0.0 <= ratio[0] <= ratio[1] <= 1.0:
            raise ValueError(f"ratio={ratio}: must be (low, high) with 0 <= low <= high <= 1")
        if not 0.0 <= prob <= 1.0:
            raise ValueError(f"prob={prob}: allowed range is [0, 1]")
        if ratio_per not in ("image", "batch"):
            raise ValueError(f"ratio_per={ratio_per!r}: allowed values are 'image', 'batch'")
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"batch_size={batch_size}: must be >= 1")
        self.ratio, self.prob = ratio, prob
        self.ratio_per, self.batch_size = ratio_per, batch_size

    def __call__(self, scores: Optional[torch.Tensor], grid: Grid,
                 generator: Optional[torch.Generator] = None, *,
                 batch_size: Optional[int] = None,
                 device: Optional[torch.device] = None) -> torch.Tensor:
        num_patches = grid[0] * grid[1]
        if scores is not None:
            if scores.dim() != 2 or scores.shape[1] != num_patches:
                raise ValueError(f"scores shape {tuple(scores.shape)} does not match grid {grid}")
            batch, device = scores.shape[0], scores.device
        else:
            if self.needs_scores:
                raise ValueError(f"{type(self).__name__} needs attention scores, got None")
            given = batch_size or self.batch_size
            if given is None:
                raise ValueError("scores=None: pass batch_size= to the masker or make_masker")
            batch = given
            device = device or (generator.device if generator is not None else torch.device("cpu"))
        n = self._draw_counts(batch, num_patches, device, generator)
        keep = _rand(batch, device=device, generator=generator) < self.prob
        n = torch.where(keep, n, torch.zeros_like(n))
        return self._select(scores, n, grid, batch, device, generator)

    def _draw_ratio(self, batch: int, device, generator) -> torch.Tensor:
        lo, hi = self.ratio
        draws = 1 if self.ratio_per == "batch" else batch
        return (lo + (hi - lo) * _rand(draws, device=device, generator=generator)).expand(batch)

    def _draw_counts(self, batch: int, num_patches: int, device, generator) -> torch.Tensor:
        return _floor_count(num_patches, self._draw_ratio(batch, device, generator))

    def _select(self, scores, n, grid, batch, device, generator) -> torch.Tensor:
        raise NotImplementedError


@register("random")
class RandomMasker(Masker):
    """iBOT ``rand``: ``n`` patches chosen uniformly without replacement."""

    def _select(self, scores, n, grid, batch, device, generator):
        noise = _rand(batch, grid[0] * grid[1], device=device, generator=generator)
        return _top_n(noise, n)


@register("attmask_high")
class AttMaskHigh(Masker):
    """AttMask-High: hide exactly the ``n`` most attended patches."""

    needs_scores = True

    def _select(self, scores, n, grid, batch, device, generator):
        return _top_n(scores, n)


@register("attmask_low")
class AttMaskLow(Masker):
    """AttMask-Low: hide exactly the ``n`` least attended patches."""

    needs_scores = True

    def _select(self, scores, n, grid, batch, device, generator):
        return _top_n(-scores, n)


@register("attmask_hint")
class AttMaskHint(Masker):
    """AttMask-Hint: the AttMask-High mask, then reveal ``k`` of the top ``show_max`` patches.

    ``k = floor(H*W*show_max*r2)`` with ``r2`` a second, independent ratio draw, or exactly
    ``num_hints`` when given; the hints are uniform among the ``floor(H*W*show_max)`` most attended
    patches, so they un-hide salient tokens the student may use as a hint.
    """

    needs_scores = True

    def __init__(self, *, show_max: float = 0.1, num_hints: Optional[int] = None,
                 **shared) -> None:
        super().__init__(**shared)
        if not 0.0 <= show_max <= 1.0:
            raise ValueError(f"show_max={show_max}: allowed range is [0, 1]")
        if num_hints is not None and num_hints < 0:
            raise ValueError(f"num_hints={num_hints}: must be >= 0 (or None to derive it)")
        self.show_max, self.num_hints = show_max, num_hints

    def most_hints(self, num_patches: int) -> int:
        """The most patches one draw can reveal on a grid of ``num_patches`` (0: never any, and
        the strategy is AttMask-High)."""
        top_count = math.floor(num_patches * self.show_max)
        if self.num_hints is not None:
            return min(self.num_hints, top_count)
        # the ratio draw is uniform on [low, high): floor(P * show_max * r) stays below P * s * high
        return max(0, math.ceil(num_patches * self.show_max * self.ratio[1] - 1e-9) - 1)

    def _select(self, scores, n, grid, batch, device, generator):
        num_patches = grid[0] * grid[1]
        mask = _top_n(scores, n)
        top_count = math.floor(num_patches * self.show_max)
        if self.num_hints is not None:
            k = torch.full((batch,), min(self.num_hints, top_count), device=device)
        else:
            k = _floor_count(num_patches, self.show_max * self._draw_ratio(batch, device, generator))
        top_set = _top_n(scores, torch.full((batch,), top_count, device=device))
        noise = _rand(batch, num_patches, device=device, generator=generator)
        hints = _top_n(noise.masked_fill(~top_set, -1.0), k)  # uniform k among the top set
        return mask & ~hints


@register("block")
class BlockMasker(Masker):
    """BEiT/iBOT block-wise masking: random rectangles until at most ``n`` patches are hidden.

    Each round proposes one rectangle per image (area ``U(min_area, budget)``, aspect ratio
    log-uniform in ``[aspect, 1/aspect]``) and accepts it when it hides 1..budget new patches; an
    image stops after ``max_tries`` rejected proposals in a row, as in BEiT. Rounds run over the
    whole batch at once.
    """

    def __init__(self, *, aspect: float = 0.3, min_area: Optional[int] = None,
                 max_tries: int = 10, **shared) -> None:
        super().__init__(**shared)
        if not 0.0 < aspect <= 1.0:
            raise ValueError(f"aspect={aspect}: allowed range is (0, 1]")
        if min_area is not None and min_area < 1:
            raise ValueError(f"min_area={min_area}: must be >= 1")
        if max_tries < 1:
            raise ValueError(f"max_tries={max_tries}: must be >= 1")
        self.log_aspect = (math.log(aspect), -math.log(aspect))
        self.min_area, self.max_tries = min_area, max_tries

    def _select(self, scores, n, grid, batch, device, generator):
        H, W = grid
        min_area = self.min_area or max(1, (min(H, W) // 3) ** 2)
        mask = torch.zeros(batch, H, W, dtype=torch.bool, device=device)
        count = torch.zeros(batch, dtype=torch.long, device=device)
        fails = torch.zeros(batch, dtype=torch.long, device=device)
        rows = torch.arange(H, device=device).view(1, H, 1)
        cols = torch.arange(W, device=device).view(1, 1, W)
        # Each accepted rectangle adds >= 1 patch, so H*W accepted rounds plus the failure streaks
        # bound the loop; the early exit is checked every few rounds to limit host syncs.
        for round_ in range((H * W + 1) * self.max_tries):
            active = (count < n) & (fails < self.max_tries)
            if round_ % self.max_tries == 0 and not bool(active.any()):
                break
            budget = (n - count).clamp(min=0).float()
            u = _rand(4, batch, device=device, generator=generator)
            area = min_area + u[0] * (budget - min_area)
            log_ar = self.log_aspect[0] + u[1] * (self.log_aspect[1] - self.log_aspect[0])
            h = torch.sqrt(area * log_ar.exp()).round().long()
            w = torch.sqrt(area / log_ar.exp()).round().long()
            fits = (h >= 1) & (w >= 1) & (h < H) & (w < W)
            top = (u[2] * (H - h + 1).clamp(min=1)).floor().long()
            left = (u[3] * (W - w + 1).clamp(min=1)).floor().long()
            rect = ((rows >= top.view(-1, 1, 1)) & (rows < (top + h).view(-1, 1, 1))
                    & (cols >= left.view(-1, 1, 1)) & (cols < (left + w).view(-1, 1, 1)))
            new = (rect & ~mask).flatten(1).sum(1)
            accept = active & fits & (new > 0) & (new <= budget)
            mask |= rect & accept.view(-1, 1, 1)
            count += torch.where(accept, new, torch.zeros_like(new))
            fails = torch.where(accept, torch.zeros_like(fails), fails + active.long())
        return mask.flatten(1)


# ----------------------------------------------------------------------------------------------


def _rand(*shape: int, device, generator) -> torch.Tensor:
    return torch.rand(*shape, device=device, generator=generator)


def _floor_count(num_patches: int, ratio: torch.Tensor) -> torch.Tensor:
    # The epsilon keeps floor(P * r) exact when P * r is an integer up to float rounding.
    return torch.floor(num_patches * ratio.double() + 1e-9).long()


def _top_n(scores: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    """Boolean mask of the ``n[b]`` highest scores of each row (a different n per row)."""
    order = scores.argsort(dim=1, descending=True, stable=True)
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(scores.shape[1], device=scores.device).expand_as(order))
    return ranks < n.view(-1, 1)
