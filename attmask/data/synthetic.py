"""Objects on backgrounds: a built-in, download-free dataset for attention-guided masking.

Each class is a procedurally drawn shape (random scale, position, rotation) pasted on a
procedural background texture. ``colours="random"`` draws the object's colour and stripes and
the background's two colours per image; ``colours="fixed"`` draws the same scenes in one object
colour on a background of two fixed greys, so that shape and pattern are all an image has. Colour
drawn per image is the cue two crops of one image agree on first, and it carries no class:
self-distillation learns it before anything else, and at a few hundred steps the features move
*away* from the class on ``random`` data and towards it on ``fixed`` data (studies/small-scale/README.md,
"The default benchmark's data"). In the training split the background *family* is
correlated with the class (``bg_correlation``), so a model that leans on the background is
measurably hurt on test variants built the ImageNet-9 way (Xiao et al., "Noise or Signal: The Role
of Image Backgrounds in Object Recognition", 2020): ``original``, ``only_fg``, ``only_bg``,
``mixed_same`` and ``mixed_rand``. Every sample carries its foreground mask, so attention on the
object can be measured. Samples are a pure function of ``(seed, split, index)``.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SHAPES = ["disk", "square", "triangle", "star", "cross", "ring", "hexagon", "diamond",
          "crescent", "heart"]
BACKGROUNDS = ["stripes", "checks", "noise", "dots", "gradient", "waves", "grid", "rings",
               "diagonal", "blobs"]
VARIANTS = ["original", "only_fg", "only_bg", "mixed_same", "mixed_rand"]
COLOURS = ["random", "fixed"]
FIXED_OBJECT = np.array([0.95, 0.9, 0.8], dtype=np.float32)  # a light cream, on either grey
FIXED_BACKGROUND = (np.full(3, 0.55, dtype=np.float32), np.full(3, 0.3, dtype=np.float32))
_SPLIT_IDS = {"train": 0, "test": 1, "variants": 2}


@dataclass
class SyntheticSample:
    image: np.ndarray  # (S, S, 3) uint8
    label: int
    fg: np.ndarray  # (S, S) bool
    meta: dict


class ObjectsOnBackgrounds:
    """Deterministic generator; ``sample(split, i)`` and ``variants(i)`` are pure functions."""

    def __init__(self, image_size: int = 32, num_classes: int = 10, bg_correlation: float = 0.8,
                 seed: int = 0, colours: str = "random") -> None:
        if not 2 <= num_classes <= len(SHAPES):
            raise ValueError(f"num_classes={num_classes}: allowed range is [2, {len(SHAPES)}]")
        if not 0.0 <= bg_correlation <= 1.0:
            raise ValueError(f"bg_correlation={bg_correlation}: allowed range is [0, 1]")
        if image_size < 8:
            raise ValueError(f"image_size={image_size}: must be >= 8")
        if colours not in COLOURS:
            raise ValueError(f"colours={colours!r}: allowed values are {', '.join(COLOURS)}")
        self.size, self.num_classes, self.colours = image_size, num_classes, colours
        self.bg_correlation, self.seed = bg_correlation, seed
        self.classes = SHAPES[:num_classes]
        self._coords = _grid(image_size)
        self._fine = _grid(2 * image_size)  # 2x supersampling gives anti-aliased edges

    def _rng(self, split: str, index: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, _SPLIT_IDS[split], index])

    def class_family(self, label: int) -> int:
        return label % len(BACKGROUNDS)

    def sample(self, split: str, index: int) -> SyntheticSample:
        """Sample ``index`` of ``train`` or ``test`` (background correlated with the class)."""
        rng = self._rng(split, index)
        label = int(rng.integers(self.num_classes))
        family = self._pick_family(rng, label)
        alpha, colour = self._object(rng, label)
        bg = self._background(rng, family)
        image = _composite(bg, colour, alpha)
        return SyntheticSample(image, label, alpha > 0.5,
                               {"shape": SHAPES[label], "background": BACKGROUNDS[family]})

    def variants(self, index: int) -> dict[str, SyntheticSample]:
        """The five ImageNet-9-style renderings of one test object (paired across variants)."""
        rng = self._rng("variants", index)
        label = int(rng.integers(self.num_classes))
        own = self._pick_family(rng, label)
        alpha, colour = self._object(rng, label)
        bg_own = self._background(rng, own)
        bg_same = self._background(rng, self.class_family(label))
        rand_family = int(rng.integers(len(BACKGROUNDS)))
        bg_rand = self._background(rng, rand_family)
        fg = alpha > 0.5
        black = np.zeros_like(bg_own)
        out = {
            "original": (_composite(bg_own, colour, alpha), own),
            "only_fg": (_composite(black, colour, alpha), -1),
            "only_bg": (_to_uint8(bg_own), own),
            "mixed_same": (_composite(bg_same, colour, alpha), self.class_family(label)),
            "mixed_rand": (_composite(bg_rand, colour, alpha), rand_family),
        }
        return {name: SyntheticSample(img, label, fg if name != "only_bg" else np.zeros_like(fg),
                                      {"shape": SHAPES[label],
                                       "background": BACKGROUNDS[f] if f >= 0 else "black"})
                for name, (img, f) in out.items()}

    # ------------------------------------------------------------------------------------------

    def _pick_family(self, rng: np.random.Generator, label: int) -> int:
        if rng.random() < self.bg_correlation:
            return self.class_family(label)
        return int(rng.integers(len(BACKGROUNDS)))

    def _object(self, rng: np.random.Generator, label: int) -> tuple[np.ndarray, np.ndarray]:
        """Soft alpha (S, S) and a textured colour image (S, S, 3) of one shape."""
        x, y = self._fine
        scale = rng.uniform(0.32, 0.5)  # half-extent as a share of the image
        cx, cy = rng.uniform(-1 + scale, 1 - scale, size=2)
        theta = rng.uniform(0, 2 * np.pi)
        c, s = np.cos(theta), np.sin(theta)
        u = ((x - cx) * c + (y - cy) * s) / scale
        v = (-(x - cx) * s + (y - cy) * c) / scale
        inside = _SHAPE_FNS[SHAPES[label]](u, v).astype(np.float32)
        alpha = inside.reshape(self.size, 2, self.size, 2).mean(axis=(1, 3))
        # Both modes draw the colour and the stripes, so the scene (shape, pose, background) of
        # a given (seed, split, index) is the same whichever colours it is drawn in.
        hue = rng.uniform(0, 1)
        base = _hsv_to_rgb(hue, rng.uniform(0.7, 1.0), rng.uniform(0.75, 1.0))
        # a texture on the object: stripes at a random frequency and angle
        xs, ys = self._coords
        phi = rng.uniform(0, np.pi)
        freq = rng.uniform(3, 7) * np.pi
        if self.colours == "fixed":
            return alpha, np.broadcast_to(FIXED_OBJECT, (self.size, self.size, 3))
        tex = 0.8 + 0.2 * np.sin(freq * (xs * np.cos(phi) + ys * np.sin(phi)))
        return alpha, base[None, None, :] * tex[..., None]

    def _background(self, rng: np.random.Generator, family: int) -> np.ndarray:
        x, y = self._coords
        a = _hsv_to_rgb(rng.uniform(0, 1), rng.uniform(0.2, 0.6), rng.uniform(0.3, 0.7))
        b = _hsv_to_rgb(rng.uniform(0, 1), rng.uniform(0.2, 0.6), rng.uniform(0.3, 0.7))
        if self.colours == "fixed":
            a, b = FIXED_BACKGROUND
        f = rng.uniform(3, 6) * np.pi
        name = BACKGROUNDS[family]
        t: np.ndarray  # a mask (bool) or a blend (float) per pixel
        if name == "stripes":
            t = np.sin(f * (x if rng.random() < 0.5 else y)) > 0
        elif name == "diagonal":
            t = np.sin(f * (x + y if rng.random() < 0.5 else x - y) / np.sqrt(2)) > 0
        elif name == "checks":
            t = (np.floor((x + 1) * f / 6) + np.floor((y + 1) * f / 6)) % 2 > 0
        elif name == "noise":
            t = rng.random(x.shape)
        elif name == "dots":
            t = (np.sin(f * x) * np.sin(f * y)) > 0.5
        elif name == "gradient":
            angle = rng.uniform(0, 2 * np.pi)
            t = (x * np.cos(angle) + y * np.sin(angle) + 1.5) / 3
        elif name == "waves":
            t = np.sin(f * x + 2.5 * np.sin(f * 0.5 * y)) > 0
        elif name == "grid":
            t = (np.abs(np.sin(f * x)) < 0.3) | (np.abs(np.sin(f * y)) < 0.3)
        elif name == "rings":
            ox, oy = rng.uniform(-1, 1, size=2)
            t = np.sin(f * np.hypot(x - ox, y - oy)) > 0
        else:  # blobs: smooth low-frequency noise
            coarse = rng.random((4, 4))
            reps = -(-self.size // 4)
            t = np.kron(coarse, np.ones((reps, reps)))[:self.size, :self.size]
            t = (t + np.roll(t, reps // 2, 0) + np.roll(t, reps // 2, 1)) / 3
        t = np.asarray(t, dtype=np.float32)[..., None]
        return a * t + b * (1 - t)


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    lin = (np.arange(size, dtype=np.float32) + 0.5) / size * 2 - 1
    y, x = np.meshgrid(lin, lin, indexing="ij")
    return x, y


def _composite(bg: np.ndarray, colour: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    return _to_uint8(bg * (1 - alpha[..., None]) + colour * alpha[..., None])


def _to_uint8(img: np.ndarray) -> np.ndarray:
    return np.clip(img * 255 + 0.5, 0, 255).astype(np.uint8)


def _hsv_to_rgb(h: float, s: float, v: float) -> np.ndarray:
    k = (np.array([5.0, 3.0, 1.0]) + h * 6) % 6
    return (v - v * s * np.clip(np.minimum(k, 4 - k), 0, 1)).astype(np.float32)


def _polar(u, v):
    return np.hypot(u, v), np.arctan2(v, u)


_SHAPE_FNS = {
    "disk": lambda u, v: u ** 2 + v ** 2 < 0.9,
    "square": lambda u, v: np.maximum(np.abs(u), np.abs(v)) < 0.75,
    "triangle": lambda u, v: (v > -0.6) & (v < 0.95 - 1.8 * np.abs(u)),
    "star": lambda u, v: _polar(u, v)[0] < 0.55 + 0.4 * np.cos(5 * _polar(u, v)[1]),
    "cross": lambda u, v: ((np.abs(u) < 0.3) & (np.abs(v) < 0.95))
                          | ((np.abs(v) < 0.3) & (np.abs(u) < 0.95)),
    "ring": lambda u, v: (np.hypot(u, v) > 0.5) & (np.hypot(u, v) < 0.95),
    "hexagon": lambda u, v: np.maximum(np.abs(u) * 0.866 + np.abs(v) * 0.5, np.abs(v)) < 0.85,
    "diamond": lambda u, v: np.abs(u) + np.abs(v) * 0.7 < 0.9,
    "crescent": lambda u, v: (np.hypot(u, v) < 0.95) & (np.hypot(u - 0.45, v) > 0.65),
    "heart": lambda u, v: ((1.1 * u) ** 2 + (-1.1 * v + 0.25) ** 2 - 1) ** 3
                          - (1.1 * u) ** 2 * (-1.1 * v + 0.25) ** 3 < 0,
}
