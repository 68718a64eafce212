"""The benchmark report: Markdown (with PNG files beside it) and a self-contained HTML page
(every plot embedded as a base64 PNG, no external resource)."""
from __future__ import annotations

import base64
import html
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

FEWSHOT = ["1", "5", "10", "20"]


@dataclass
class RunRecord:
    strategy: str
    seed: int
    run_name: str
    mlflow_run_id: Optional[str] = None
    results: dict = field(default_factory=dict)  # evaluate's results.json
    knn_history: list[tuple[float, float]] = field(default_factory=list)  # (epoch, knn_top1)
    wall_s: float = 0.0
    images_per_s: float = 0.0
    device: str = ""
    error: Optional[str] = None
    skipped: bool = False  # found finished in MLflow, not rerun
    overlay_png: Optional[bytes] = None


@dataclass
class Table:
    title: str
    columns: list[str]
    rows: list[list[str]]
    note: str = ""


def mean_std(values: list[float]) -> str:
    if not values:
        return "—"
    if len(values) == 1:
        return f"{100 * values[0]:.1f}"
    return f"{100 * statistics.fmean(values):.1f} ± {100 * statistics.stdev(values):.1f}"


def _values(runs: list[RunRecord], path: tuple[str, ...]) -> list[float]:
    out = []
    for r in runs:
        node = r.results
        for key in path:
            node = node.get(key, {}) if isinstance(node, dict) else {}
        if isinstance(node, (int, float)):
            out.append(float(node))
    return out


def build_tables(runs: list[RunRecord], strategies: list[str]) -> list[Table]:
    ok = {s: [r for r in runs if r.strategy == s and r.error is None] for s in strategies}
    tables = [
        Table("k-NN on the teacher's [CLS] (k = 20, T = 0.07), %", ["strategy", "top-1", "top-5"],
              [[s, mean_std(_values(ok[s], ("knn", "k20", "top1"))),
                mean_std(_values(ok[s], ("knn", "k20", "top5")))] for s in strategies]),
        Table("Linear probe (last 4 blocks, epoch chosen on a validation split), %",
              ["strategy", "test top-1", "val top-1"],
              [[s, mean_std(_values(ok[s], ("linear", "top1"))),
                mean_std(_values(ok[s], ("linear", "val_top1")))] for s in strategies]),
        Table("Few-shot k-NN (nu images per class; 1-NN for nu = 1, else 20-NN; 5 splits), %",
              ["strategy", *[f"nu={nu}" for nu in FEWSHOT]],
              [[s, *[mean_std(_values(ok[s], ("fewshot", nu, "mean"))) for nu in FEWSHOT]]
               for s in strategies], "— : the data has too few images per class for 5 disjoint splits"),
    ]
    variants = sorted({v for r in runs for v in r.results.get("robustness", {}).get("variants", {})})
    if variants:
        tables.append(Table("Background robustness (linear probe fit on the original training "
                            "split), %; BG-gap = mixed_same - mixed_rand",
                            ["strategy", *variants, "BG-gap"],
                            [[s, *[mean_std(_values(ok[s], ("robustness", "variants", v)))
                                   for v in variants],
                              mean_std(_values(ok[s], ("robustness", "bg_gap")))]
                             for s in strategies]))
    if any("attention" in r.results for r in runs):
        tables.append(Table("Attention on the object, % of patches on the foreground",
                            ["strategy", "top-10% attended", "AttMask-High masked", "all patches"],
                            [[s, mean_std(_values(ok[s], ("attention", "topk_on_object"))),
                              mean_std(_values(ok[s], ("attention", "masked_on_object"))),
                              mean_std(_values(ok[s], ("attention", "object_share")))]
                             for s in strategies]))
    tables.append(Table("Cost per run", ["run", "wall time (s)", "train images/s", "device",
                                         "status"],
                        [[r.run_name, f"{r.wall_s:.0f}", f"{r.images_per_s:.1f}", r.device,
                          "failed: " + r.error if r.error else
                          ("reused (finished earlier)" if r.skipped else "ok")] for r in runs]))
    return tables


@dataclass
class Report:
    title: str
    intro: list[str]
    tables: list[Table]
    figures: list[tuple[str, str, bytes]]  # (file name, caption, png)

    def markdown(self) -> str:
        lines = [f"# {self.title}", "", *self.intro, ""]
        for t in self.tables:
            lines += [f"## {t.title}", "", "| " + " | ".join(t.columns) + " |",
                      "|" + "|".join("---" for _ in t.columns) + "|"]
            lines += ["| " + " | ".join(row) + " |" for row in t.rows]
            lines += (["", f"{t.note}"] if t.note else []) + [""]
        for name, caption, _ in self.figures:
            lines += [f"## {caption}", "", f"![{caption}](img/{name})", ""]
        return "\n".join(lines)

    def html(self) -> str:
        esc = html.escape
        parts = ["<!DOCTYPE html><html><head><meta charset='utf-8'>",
                 f"<title>{esc(self.title)}</title><style>",
                 "body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}",
                 "table{border-collapse:collapse;margin:0.5em 0 1.5em}",
                 "th,td{border:1px solid #bbb;padding:4px 10px;text-align:right}",
                 "th:first-child,td:first-child{text-align:left}th{background:#eee}",
                 "img{max-width:100%;border:1px solid #ddd}.note{color:#666;font-size:90%}",
                 "</style></head><body>", f"<h1>{esc(self.title)}</h1>"]
        parts += [f"<p>{esc(p)}</p>" for p in self.intro if p]
        for t in self.tables:
            parts.append(f"<h2>{esc(t.title)}</h2><table><thead><tr>"
                         + "".join(f"<th>{esc(c)}</th>" for c in t.columns) + "</tr></thead><tbody>")
            parts += ["<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>"
                      for row in t.rows]
            parts.append("</tbody></table>")
            if t.note:
                parts.append(f"<p class='note'>{esc(t.note)}</p>")
        for name, caption, png in self.figures:
            data = base64.b64encode(png).decode()
            parts.append(f"<h2>{esc(caption)}</h2><figure><img alt='{esc(name)}' "
                         f"src='data:image/png;base64,{data}'></figure>")
        parts.append("</body></html>")
        return "\n".join(parts)

    def write(self, out_dir: Path) -> tuple[Path, Path]:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "img").mkdir(exist_ok=True)
        for name, _, png in self.figures:
            (out_dir / "img" / name).write_bytes(png)
        md, page = out_dir / "report.md", out_dir / "report.html"
        md.write_text(self.markdown())
        page.write_text(self.html())
        return md, page


def build_figures(runs: list[RunRecord], strategies: list[str]) -> list[tuple[str, str, bytes]]:
    from attmask.viz import bar_chart_png, line_chart_png

    figures = []
    histories = {f"{r.strategy} (seed {r.seed})": r.knn_history for r in runs if r.knn_history}
    if histories:
        figures.append(("online_knn.png", "Online k-NN top-1 of the teacher during pretraining",
                        line_chart_png(histories, "online k-NN (k=20) during pretraining", "epoch",
                                       "top-1")))
    series, errors = {}, {}
    for s in strategies:
        variants: dict[str, list[float]] = {}
        for r in runs:
            if r.strategy == s and r.error is None:
                for v, acc in r.results.get("robustness", {}).get("variants", {}).items():
                    variants.setdefault(v, []).append(acc)
        if variants:
            series[s] = {v: statistics.fmean(a) for v, a in variants.items()}
            errors[s] = {v: statistics.stdev(a) if len(a) > 1 else 0.0 for v, a in variants.items()}
    if series:
        figures.append(("robustness.png", "Background robustness per test variant",
                        bar_chart_png(series, "linear-probe accuracy per test variant",
                                      errors=errors)))
    for r in runs:
        if r.overlay_png and r.seed == min(x.seed for x in runs if x.strategy == r.strategy):
            figures.append((f"overlay_{r.strategy}.png",
                            f"Teacher attention and the masks each strategy picks — model "
                            f"pretrained with {r.strategy}", r.overlay_png))
    return figures
