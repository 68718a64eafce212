"""Fault injection for reliability tests: a worker that dies mid-run, or weights that go
non-finite, at a chosen step.

Orchestration, not library: it plugs into the training loop through ``attmask.train.Hooks``
(``before_step`` / ``after_step``) and is switched on by the CLI's ``--inject-fault`` option.
"""
from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

from attmask.errors import UserError

KINDS = ("exit", "nan")


@dataclass(frozen=True)
class FaultInjection:
    """At step ``step`` the worker of rank ``rank`` either exits without cleanup, right after
    that step's checkpoint and logs (``exit``; once per run when ``marker`` names a file that
    remembers it), or has its student weights set to NaN just before the step, so that step's
    loss is NaN as in a real divergence (``nan``)."""

    step: int
    kind: Literal["exit", "nan"] = "exit"
    rank: int = 0
    marker: Optional[str] = None

    @classmethod
    def parse(cls, text: str) -> "FaultInjection":
        """``STEP[:KIND[:RANK]]``, e.g. ``5``, ``4:nan`` or ``5:exit:1``."""
        parts = text.split(":")
        try:
            step = int(parts[0])
            kind = parts[1] if len(parts) > 1 else "exit"
            rank = int(parts[2]) if len(parts) > 2 else 0
        except ValueError:
            step, kind, rank = -1, "", -1
        if len(parts) > 3 or step < 1 or kind not in KINDS or rank < 0:
            raise UserError(f"--inject-fault {text}: expected STEP[:KIND[:RANK]] with STEP >= 1, "
                            f"KIND one of {', '.join(KINDS)} and RANK >= 0 (e.g. 5:exit:1)")
        return cls(step, kind, rank)  # type: ignore[arg-type]

    def with_marker(self, path: str | Path) -> "FaultInjection":
        return dataclasses.replace(self, marker=str(path))

    def before_step(self, engine, rank: int) -> None:
        if self.kind == "nan" and rank == self.rank and engine.step + 1 == self.step:
            import torch

            with torch.no_grad():
                next(engine.student.parameters()).fill_(float("nan"))

    def after_step(self, engine, rank: int) -> None:
        if self.kind != "exit" or rank != self.rank or engine.step != self.step:
            return
        if self.marker is not None:
            marker = Path(self.marker)
            if marker.exists():
                return
            marker.parent.mkdir(parents=True, exist_ok=True)
            marker.write_text(f"fault injected at step {engine.step}\n")
        # Let the Ray Train controller register the last report first (it polls periodically),
        # as a real crash a little later would; then die without cleanup.
        time.sleep(max(2.0, 3 * float(os.environ.get("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "2"))))
        os._exit(1)
