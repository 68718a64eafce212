"""Trial C1 of studies/small-scale/README.md: the built-in objects-on-backgrounds data with each object's
hue set by its class (class / num_classes +- 0.04) instead of drawn at random, so that colour,
the cue two crops of one image agree on first, carries the class. Everything else (shapes,
textures, backgrounds, sizes) is drawn exactly as in ``attmask/data/synthetic.py``.

    PYTHONPATH=. python studies/small-scale/class_hue_data.py OUT_DIR

With SMOKE=1 (tests/test_scripts.py) it draws 64 training and 32 test scenes.
"""
import os
import sys

import numpy as np

import attmask.data.synthetic as syn
import run_pipeline


def class_hue_object(self, rng, label):
    x, y = self._fine
    scale = rng.uniform(0.32, 0.5)
    cx, cy = rng.uniform(-1 + scale, 1 - scale, size=2)
    theta = rng.uniform(0, 2 * np.pi)
    c, s = np.cos(theta), np.sin(theta)
    u = ((x - cx) * c + (y - cy) * s) / scale
    v = (-(x - cx) * s + (y - cy) * c) / scale
    inside = syn._SHAPE_FNS[syn.SHAPES[label]](u, v).astype(np.float32)
    alpha = inside.reshape(self.size, 2, self.size, 2).mean(axis=(1, 3))
    hue = (label / self.num_classes + rng.uniform(-0.04, 0.04)) % 1  # the one change
    base = syn._hsv_to_rgb(hue, rng.uniform(0.7, 1.0), rng.uniform(0.75, 1.0))
    xs, ys = self._coords
    phi = rng.uniform(0, np.pi)
    freq = rng.uniform(3, 7) * np.pi
    tex = 0.8 + 0.2 * np.sin(freq * (xs * np.cos(phi) + ys * np.sin(phi)))
    return alpha, base[None, None, :] * tex[..., None]


if __name__ == "__main__":
    syn.ObjectsOnBackgrounds._object = class_hue_object
    smoke = os.environ.get("SMOKE") == "1"
    sys.exit(run_pipeline.main(["prepare-data", "--source", "synthetic", "--out", sys.argv[1],
                                "--num-samples", "64" if smoke else "4000",
                                "--num-test-samples", "32" if smoke else "1000",
                                "--image-size", "32"]))
