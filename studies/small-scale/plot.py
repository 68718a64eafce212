"""Plot the recipe study: online k-NN of the teacher against CPU-minutes of training, one line
per trial, the untrained network's score (step 0) as a horizontal line.

Usage: python studies/small-scale/plot.py [CURVES] [OUT_PNG]
       CURVES: a study directory (runs/study: <trial>/metrics.jsonl) or a folder of
       <trial>.jsonl copies (default: studies/small-scale/curves, the committed curves)
Prints a table (trial, steps, CPU-minutes, init, best and last k-NN) for studies/small-scale/README.md.
"""
from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

from attmask.viz import line_chart_png


def curves(study: Path) -> dict[str, list[tuple[float, float]]]:
    """trial -> [(training minutes, k-NN top-1 %)], from each run's metrics.jsonl."""
    out = {}
    files = sorted(study.glob("*/metrics.jsonl")) or sorted(study.glob("*.jsonl"))
    for metrics in files:
        name = metrics.parent.name if metrics.name == "metrics.jsonl" else metrics.stem
        rows = [json.loads(line) for line in metrics.read_text().splitlines()]
        points = [(minutes / 60, 100 * r["knn_top1"])
                  for r, minutes in zip(rows, training_seconds(rows)) if "knn_top1" in r]
        # runs logged before the monitor's value stopped repeating: keep where it changed
        points = [p for i, p in enumerate(points)
                  if i in (0, len(points) - 1) or p[1] != points[i - 1][1]]
        if points:
            out[name] = points
    return out


def training_seconds(rows: list[dict]) -> list[float]:
    """Each row's training time since the run began. A run resumed from a checkpoint written
    before ``train_s`` was kept in checkpoints (2026-11-29) restarted its clock at 0: its
    later rows go on from the last time logged before the restart."""
    out, offset, last = [], 0.0, 0.0
    for r in rows:
        t = r.get("train_s", 0.0)
        if t < last:
            offset += last
        last = t
        out.append(offset + t)
    return out


def main() -> None:
    study = Path(sys.argv[1] if len(sys.argv) > 1 else "studies/small-scale/curves")
    png = Path(sys.argv[2] if len(sys.argv) > 2 else "studies/small-scale/knn_vs_cpu_minutes.png")
    series = curves(study)
    inits = sorted({round(pts[0][1], 1) for pts in series.values() if pts[0][0] == 0})
    hlines = {f"init (untrained) {v} %": v for v in inits}  # one per architecture
    if inits:  # against the init most trials share (the recipe's architecture and seed)
        common = Counter(round(pts[0][1], 1) for pts in series.values()
                         if pts[0][0] == 0).most_common(1)[0][0]
        hlines[f"target: init + 10 = {common + 10:.1f} %"] = common + 10
    png.write_bytes(line_chart_png(series, "CIFAR-10 32 px: teacher k-NN (k=20) while training",
                                   "training CPU-minutes (2 cores)", "k-NN top-1 %", hlines))
    print("| trial | CPU-min | init | best | last | gain (last - init) |")
    print("|---|---|---|---|---|---|")
    for name, pts in series.items():
        print(f"| {name} | {pts[-1][0]:.1f} | {pts[0][1]:.1f} | {max(p[1] for p in pts):.1f} | "
              f"{pts[-1][1]:.1f} | {pts[-1][1] - pts[0][1]:+.1f} |")


if __name__ == "__main__":
    main()
