"""Device, precision, schedules, seeds and checkpoint loading (attmask/runtime.py)."""
import numpy as np
import pytest
import torch

from attmask.errors import ConfigError
from attmask.runtime import cosine_schedule, resolve_device, resolve_precision, step_seed


def test_cosine_schedule_warmup_and_end_points():
    s = cosine_schedule(1.0, 0.1, epochs=4, steps_per_epoch=10, warmup_epochs=1)
    assert len(s) == 40 and s[0] == 0.0 and s[10] == pytest.approx(1.0)
    assert np.all(np.diff(s[:10]) > 0) and np.all(np.diff(s[10:]) <= 0)
    assert s[-1] == pytest.approx(0.1, abs=5e-3)  # as DINO: one step short of the end
    m = cosine_schedule(0.99, 1.0, epochs=2, steps_per_epoch=5)
    assert m[0] == pytest.approx(0.99) and m[-1] < 1.0 and np.all(np.diff(m) >= 0)


def test_precision_resolution_degrades_on_cpu():
    cpu = torch.device("cpu")
    assert resolve_precision("fp32", cpu) == "fp32"
    assert resolve_precision("fp16", cpu) in ("bf16", "fp32")
    assert resolve_precision("auto", cpu) in ("bf16", "fp32")


def test_step_seeds_differ_by_seed_rank_step_and_purpose_and_are_stable():
    seeds = {step_seed(s, r, t, p) for s in range(3) for r in range(3) for t in range(50)
             for p in ("global", "masking")}
    assert len(seeds) == 900 and all(0 <= x < 2 ** 63 for x in seeds)
    assert step_seed(1, 2, 3, "masking") == step_seed(1, 2, 3, "masking")


def test_device_names_are_checked():
    assert resolve_device("cpu") == torch.device("cpu")
    for bad in ("foo", "meta", "cuda:99"):
        with pytest.raises(ConfigError, match="--device"):
            resolve_device(bad)
