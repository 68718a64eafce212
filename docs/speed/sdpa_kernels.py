"""Which attention kernel makes the CPU training step faster, per precision (docs/speed.md).

Times the whole training step of a preset with PyTorch's default scaled-dot-product-attention
choice, the math kernel and the flash kernel forced, interleaved step by step in one process.
Usage: PYTHONPATH=. python docs/speed/sdpa_kernels.py tiny-cpu bf16   (any preset, fp32 or bf16)
With SMOKE=1 (tests/test_scripts.py): one timed step per kernel instead of six.
"""
import contextlib
import os
import statistics
import sys
import time

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from attmask.config import load_config
from attmask.engine import Engine

preset, precision = sys.argv[1], sys.argv[2]
torch.set_num_threads(2)
cfg = load_config(preset=preset, overrides=[f"train.precision={precision}"])
engine = Engine(cfg, steps_per_epoch=10_000)
# The engine picks a kernel inside its own autocast; time the step without that choice.
engine.autocast = lambda: torch.autocast("cpu", torch.bfloat16, enabled=precision == "bf16")
B, m = cfg.train.batch_size_per_worker, cfg.model
global_crops = torch.randn(2, B, 3, m.image_size, m.image_size)
local_crops = torch.randn(cfg.data.local_crops_number, B, 3, m.local_image_size,
                          m.local_image_size)
kernels = {"default": contextlib.nullcontext, "math": lambda: sdpa_kernel(SDPBackend.MATH),
           "flash": lambda: sdpa_kernel(SDPBackend.FLASH_ATTENTION)}
times: dict[str, list[float]] = {name: [] for name in kernels}
rounds = 3 if os.environ.get("SMOKE") == "1" else 8
for round_ in range(rounds):
    for name, kernel in kernels.items():
        start = time.perf_counter()
        with kernel():
            engine.train_step(global_crops, local_crops)
        if round_ >= 2:
            times[name].append(time.perf_counter() - start)
print(f"{preset} {precision}, images/s (median of {rounds - 2} steps after 2 warm-up):",
      {name: round(B / statistics.median(t), 2) for name, t in times.items()})
