"""Pictures of what AttMask hides: images, the teacher's [CLS] attention and each strategy's mask."""
from __future__ import annotations

import io
import itertools
from typing import Any, Optional, Sequence

import numpy as np
import torch

from attmask.data.transforms import MEAN, STD
from attmask.masking import make_masker
from attmask.models.vit import MaskedViT


def denormalize(images: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) normalised -> (B, H, W, 3) floats in [0, 1]."""
    mean = torch.tensor(MEAN).view(1, 3, 1, 1)
    std = torch.tensor(STD).view(1, 3, 1, 1)
    return (images.detach().float().cpu() * std + mean).clamp(0, 1).permute(0, 2, 3, 1).numpy()


@torch.no_grad()
def attention_and_masks(backbone: MaskedViT, images: torch.Tensor, patch_size: int,
                        strategies: Sequence[str], layer: int = -1, head_reduce: str = "mean",
                        ratio: tuple[float, float] = (0.3, 0.3), seed: int = 0):
    """Teacher attention (B, H, W) and, per strategy, the boolean mask (B, H, W) it would pick
    (every image masked, one fixed ratio, so the strategies are directly comparable)."""
    device = next(backbone.parameters()).device
    grid = (images.shape[2] // patch_size, images.shape[3] // patch_size)
    attn = backbone.forward_tokens(images.to(device), attn_layer=layer,
                                   head_reduce=head_reduce).attention
    assert attn is not None  # asked for with attn_layer
    masks = {}
    for name in strategies:
        generator = torch.Generator(device).manual_seed(seed)
        masker = make_masker(name, ratio=ratio, prob=1.0)
        masks[name] = masker(attn, grid, generator).view(-1, *grid).cpu()
    return attn.view(-1, *grid).cpu(), masks


def _figure_png(fig) -> bytes:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80)
    plt.close(fig)
    return buf.getvalue()


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def confusion_png(cm: torch.Tensor, classes: Sequence[str], title: str = "") -> bytes:
    """Row-normalised confusion matrix (true class in rows)."""
    plt = _pyplot()
    share = (cm.float() / cm.sum(1, keepdim=True).clamp(min=1)).numpy()
    fig, ax = plt.subplots(figsize=(1 + 0.45 * len(classes), 1 + 0.45 * len(classes)))
    ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(classes)), classes, rotation=90, fontsize=7)
    ax.set_yticks(range(len(classes)), classes, fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return _figure_png(fig)


def bar_chart_png(series: dict[str, dict[str, float]], title: str, ylabel: str = "accuracy",
                  errors: Optional[dict[str, dict[str, float]]] = None) -> bytes:
    """Grouped bars: ``series[name][category] = value`` (one colour per series)."""
    plt = _pyplot()
    categories = list(dict.fromkeys(c for values in series.values() for c in values))
    width = 0.8 / max(1, len(series))
    fig, ax = plt.subplots(figsize=(max(4, 1.2 * len(categories) + 1), 3.2))
    for i, (name, values) in enumerate(series.items()):
        xs = [j + i * width for j in range(len(categories))]
        err = [errors[name].get(c, 0) for c in categories] if errors else None
        ax.bar(xs, [values.get(c, 0) for c in categories], width, yerr=err, label=name)
    ax.set_xticks([j + width * (len(series) - 1) / 2 for j in range(len(categories))],
                  categories, rotation=20, fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    if len(series) > 1:
        ax.legend(fontsize=7)
    fig.tight_layout()
    return _figure_png(fig)


def series_styles(count: int, colours: Sequence) -> list[tuple[Any, str, str]]:
    """(colour, line style, marker) for ``count`` series: past the palette's length a colour
    comes back with another line style and marker, so no two series look alike (up to three
    times the palette)."""
    return [(colours[i % len(colours)], ("-", "--", ":")[i // len(colours) % 3],
             "osD"[i // len(colours) % 3]) for i in range(count)]


def line_chart_png(series: dict[str, list[tuple[float, float]]], title: str, xlabel: str,
                   ylabel: str, hlines: Optional[dict[str, float]] = None) -> bytes:
    """One line per series; ``hlines`` adds labelled horizontal reference lines (baselines)."""
    plt = _pyplot()
    entries = len(series) + len(hlines or {})
    many = entries > 8  # the legend then goes beside the axes, as tall as it needs
    fig, ax = plt.subplots(figsize=(8, max(4.0, 0.6 + 0.17 * entries)) if many else (5, 3.2))
    colours = plt.get_cmap("tab20" if len(series) > 10 else "tab10").colors
    for (name, points), (colour, style, marker) in zip(series.items(),
                                                       series_styles(len(series), colours)):
        if points:
            xs, ys = zip(*points)
            ax.plot(xs, ys, marker=marker, markersize=4, color=colour, linestyle=style,
                    label=name)
    for (name, y), style in zip((hlines or {}).items(), itertools.cycle(("--", ":", "-."))):
        ax.axhline(y, color="black", linestyle=style, linewidth=1, label=name)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    if many:
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    else:
        ax.legend(fontsize=7)
    fig.tight_layout()
    return _figure_png(fig)


def param_plot_png(rows: list[dict], params: Sequence[str], metric: str) -> bytes:
    """One panel per searched parameter: the metric of every trial against its value (lists
    and strings on a categorical axis)."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(params), figsize=(3.2 * len(params), 3), squeeze=False)
    for ax, param in zip(axes[0], params):
        points = [(r[param], r[metric]) for r in rows if r.get(metric) is not None]
        numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v, _ in points)
        if numeric:
            ax.scatter([v for v, _ in points], [m for _, m in points])
        else:
            labels = sorted({str(v) for v, _ in points})
            ax.scatter([labels.index(str(v)) for v, _ in points], [m for _, m in points])
            ax.set_xticks(range(len(labels)), labels, rotation=30, fontsize=7)
        ax.set_xlabel(param, fontsize=8)
        ax.set_ylabel(metric, fontsize=8)
    fig.tight_layout()
    return _figure_png(fig)


def mask_grid_png(images: torch.Tensor, attention: torch.Tensor,
                  masks: dict[str, torch.Tensor], title: Optional[str] = None) -> bytes:
    """One row per image: the image, its attention heat map, then each strategy's mask (hidden
    patches greyed out). Returns PNG bytes."""
    plt = _pyplot()
    pictures = denormalize(images)
    rows, cols = len(pictures), 2 + len(masks)
    fig, axes = plt.subplots(rows, cols, figsize=(1.6 * cols, 1.6 * rows + (0.4 if title else 0)),
                             squeeze=False)
    size = pictures.shape[1:3]
    for r in range(rows):
        heat = torch.nn.functional.interpolate(attention[r][None, None].float(), size=size,
                                               mode="nearest")[0, 0].numpy()
        panels = [(pictures[r], "image"), (heat, "attention")]
        for name, mask in masks.items():
            hidden = torch.nn.functional.interpolate(mask[r][None, None].float(), size=size,
                                                     mode="nearest")[0, 0].numpy()[..., None]
            panels.append((pictures[r] * (1 - hidden) + 0.5 * hidden, name))
        for c, (img, label) in enumerate(panels):
            ax = axes[r][c]
            ax.imshow(img, cmap="inferno" if img.ndim == 2 else None, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(label, fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return _figure_png(fig)
