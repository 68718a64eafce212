"""The figure docs/synthetic_colours.png: the same ten training scenes of the built-in data in
random colours (top, `prepare-data --colours random`) and in fixed colours (bottom, `--colours
fixed`, the main job's data), drawn at 32 px and shown at 4x.

    PYTHONPATH=. python docs/synthetic_colours.py [OUT_PNG]
"""
import sys

import numpy as np
from PIL import Image

from attmask.data.synthetic import ObjectsOnBackgrounds

if __name__ == "__main__":
    rows = [np.concatenate([ObjectsOnBackgrounds(32, colours=c).sample("train", i).image
                            for i in range(10)], axis=1) for c in ("random", "fixed")]
    grid = np.concatenate(rows, axis=0)
    Image.fromarray(grid).resize((grid.shape[1] * 4, grid.shape[0] * 4), Image.NEAREST).save(
        sys.argv[1] if len(sys.argv) > 1 else "docs/synthetic_colours.png")
