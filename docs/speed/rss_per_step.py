"""Resident memory of a process doing only training steps, printed as the steps go: a cache that
grows per step shows here as a rising line (docs/speed.md, section 5).

    PYTHONPATH=. python docs/speed/rss_per_step.py tiny-cpu bf16 200
"""
import resource
import sys

import torch

from attmask.config import load_config
from attmask.engine import Engine
from attmask.masking import make_masker


def rss_mb() -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) // 1024 for line in status if line.startswith("VmRSS"))


def main(preset: str, precision: str, steps: int) -> None:
    torch.set_num_threads(2)
    cfg = load_config(preset, overrides={"train.precision": precision})
    engine = Engine(cfg, steps_per_epoch=10_000, device=torch.device("cpu"))
    engine.masker = make_masker("attmask_high", **cfg.masking.masker_kwargs("attmask_high"))
    print(f"engine built: {rss_mb()} MB")
    b, m, n_local = cfg.train.batch_size_per_worker, cfg.model, cfg.data.local_crops_number
    crops = torch.randn(2, b, 3, m.image_size, m.image_size)
    local = torch.randn(n_local, b, 3, m.local_image_size, m.local_image_size) if n_local else None
    for step in range(1, steps + 1):
        engine.train_step(crops, local)
        if step in (1, 10, 20, 40, 80) or step % 100 == 0:
            print(f"step {step}: {rss_mb()} MB", flush=True)
    print(f"peak: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024} MB")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
