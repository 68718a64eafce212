"""What every stage needs from the machine and the disk, in one place: the device and precision
to run on, how a device is described in reports, checkpoint loading without running code, the
per-iteration schedules and the per-step seeds. No model or data code here."""
from __future__ import annotations

import hashlib
import logging
import platform
import re
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from attmask.errors import CheckpointError, ConfigError

log = logging.getLogger(__name__)


def cosine_schedule(base: float, final: float, epochs: int, steps_per_epoch: int,
                    warmup_epochs: float = 0, warmup_start: float = 0.0) -> np.ndarray:
    """Per-iteration values: linear warm-up from ``warmup_start``, then cosine to ``final``."""
    total = epochs * steps_per_epoch
    warm = min(int(warmup_epochs * steps_per_epoch), total)
    warmup = np.linspace(warmup_start, base, warm, endpoint=False)
    t = np.arange(total - warm)
    cosine = final + 0.5 * (base - final) * (1 + np.cos(np.pi * t / max(1, len(t))))
    return np.concatenate([warmup, cosine])


def teacher_temperature(warmup: float, final: float, warmup_epochs: int,
                        epochs: int) -> np.ndarray:
    """Per-epoch teacher temperature (DINO/iBOT): linear warm-up, then constant."""
    warm = np.linspace(warmup, final, warmup_epochs)
    return np.concatenate([warm, np.full(max(0, epochs - warmup_epochs), final)])[:epochs]


def resolve_device(device: Optional[str] = None) -> torch.device:
    """``device`` (cpu, cuda, cuda:N) checked against this machine; default: cuda when present."""
    if not device:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as exc:
        raise ConfigError(f"--device {device}: not a device; allowed: cpu, cuda, cuda:N") from exc
    if resolved.type not in ("cpu", "cuda"):
        raise ConfigError(f"--device {device}: allowed: cpu, cuda, cuda:N")
    if resolved.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0 or (resolved.index or 0) >= count:
            raise ConfigError(f"--device {device}: this machine has {count} CUDA device(s)")
    return resolved


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto``: bf16 where the hardware has it, fp16 on older GPUs, else fp32."""
    if device.type == "cuda":
        if precision == "auto":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return precision
    cpu_bf16 = torch.cpu._is_avx512_bf16_supported()
    if precision == "auto":
        return "bf16" if cpu_bf16 else "fp32"
    if precision == "fp16":  # the gradient scaler path is for GPUs; degrade instead of failing
        fallback = "bf16" if cpu_bf16 else "fp32"
        log.warning("train.precision=fp16 needs a CUDA GPU; using %s on CPU", fallback)
        return fallback
    return precision


def describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"


def load_checkpoint(path: str | Path, device: torch.device | str = "cpu") -> dict:
    """Load a checkpoint without running pickled code; any other content is a user error that
    says what was found (a checkpoint that needs code to load is refused, never executed)."""
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except FileNotFoundError as exc:
        raise CheckpointError(f"checkpoint not found: {path}") from exc
    except Exception as exc:  # noqa: BLE001 - torn files, foreign formats, pickled code
        text = str(exc)
        code = sorted(set(re.findall(r"GLOBAL ([\w.]+)", text)))
        refused = re.search(r"WeightsUnpickler error:\s*(\S[^\n]*)", text)
        reason = (f"contains code references: {', '.join(code)}" if code else
                  f"refused by the safe loader: {refused.group(1)[:160]}" if refused else
                  f"{exc.__class__.__name__}: {text.splitlines()[0][:160] if text else 'unreadable'}")
        raise CheckpointError(f"checkpoint {path} cannot be loaded ({reason})") from exc
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(state).__name__}, not a "
                              "training checkpoint (a dict of state)")
    return state


def step_seed(seed: int, rank: int, step: int, purpose: str) -> int:
    """A 63-bit seed for one (run seed, rank, step, purpose); distinct tuples give unrelated
    seeds. ``purpose`` keeps two generators of one step apart: seeded alike, the masker's
    generator and the global one (drop path) would draw the same uniforms."""
    digest = hashlib.blake2b(f"{seed}/{rank}/{step}/{purpose}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1
