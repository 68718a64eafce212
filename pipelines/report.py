"""The benchmark report: Markdown (with PNG files beside it) and a self-contained HTML page
(every plot embedded as a base64 PNG, no external resource)."""
from __future__ import annotations

import base64
import html
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from attmask.eval.results import (
    BG_GAP,
    HITS_K,
    KNN_N,
    KNN_TOP1,
    KNN_TOP5,
    LINEAR_TOP1,
    LINEAR_VAL_TOP1,
    decode_hits,
    lookup,
)
from attmask.eval.stats import (
    PairedDifference,
    cochran_q,
    holm,
    images_for_half_width,
    normal_p,
    paired_difference,
    paired_hits,
    proportion_difference,
    seeds_for_half_width_range,
    split_spread,
    t_quantile,
    two_way_difference,
)

FEWSHOT = ["1", "5", "10", "20"]


@dataclass
class RunRecord:
    strategy: str
    seed: int
    run_name: str
    mlflow_run_id: Optional[str] = None
    results: dict = field(default_factory=dict)  # evaluate's results.json
    knn_history: list[tuple[float, float]] = field(default_factory=list)  # (epoch, knn_top1)
    wall_s: float = 0.0  # this invocation: pretraining (the part it ran) and evaluation
    train_s: float = 0.0  # pretraining over all its sessions (the trainer's checkpointed clock)
    images_per_s: float = 0.0
    device: str = ""
    error: Optional[str] = None
    skipped: bool = False  # finished earlier (in MLflow or the report folder), not rerun
    overlay_png: Optional[bytes] = None
    model_version: str = ""  # the teacher backbone in MLflow's registry: NAME/VERSION
    commit: str = ""  # the checkout that trained it (git_commit), "" for records before it was kept
    code_digest: str = ""  # hash of the library code that trained it (tracking.code_digest)
    evaluation_run_id: Optional[str] = None  # the benchmark's evaluation run in MLflow

    @property
    def eval_s(self) -> float:
        return float(self.results.get("wall_s", 0.0))

    @property
    def machine_s(self) -> float:
        """What the run cost: its training steps over every session it took (a resumed run's
        earlier sessions included) and its evaluation; records from before the trainer's clock
        was kept fall back to the wall time of the invocation that finished them."""
        return self.train_s + self.eval_s if self.train_s else self.wall_s


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


def signed(values: list[float]) -> str:
    """Mean ± std of differences in points, with an explicit sign."""
    if not values:
        return "—"
    mean = f"{100 * statistics.fmean(values):+.1f}"
    return mean if len(values) == 1 else f"{mean} ± {100 * statistics.stdev(values):.1f}"


def metric_values(runs: list[RunRecord], path: tuple[str, ...]) -> list[float]:
    return [v for r in runs if (v := lookup(r.results, path)) is not None]


def knn_hits(results: dict) -> Optional[tuple[np.ndarray, str]]:
    """Per-image k-NN top-1 hits and the digest of their test images, where recorded."""
    entry = results.get("knn", {}).get(f"k{HITS_K}")
    return decode_hits(entry) if isinstance(entry, dict) else None


def hits_difference(arm: dict, reference: dict) -> Optional[tuple[PairedDifference, float]]:
    """k-NN top-1 of ``arm`` minus ``reference`` image by image, and the share of images one
    gets right and the other wrong; None unless both have hits on the same test images."""
    a, b = knn_hits(arm), knn_hits(reference)
    if a is None or b is None or a[1] != b[1]:
        return None
    return paired_hits(a[0], b[0]), float((a[0] != b[0]).mean())


def two_way_hits(pairs: list[tuple[dict, dict]]) -> Optional[PairedDifference]:
    """The k-NN difference over seeds and test images (stats.two_way_difference) from each
    seed's (arm, reference) per-image hits; None unless every one has hits on the same images."""
    rows = []
    for arm, reference in pairs:
        a, b = knn_hits(arm), knn_hits(reference)
        if a is None or b is None or a[1] != b[1] or (rows and a[1] != rows[0][1]):
            return None
        rows.append((a[0].astype(float) - b[0].astype(float), a[1]))
    return two_way_difference(np.stack([r for r, _ in rows])) if len(rows) >= 2 else None


PAIRED_METRICS = [("k-NN top-1", KNN_TOP1), ("linear top-1", LINEAR_TOP1), ("BG-gap", BG_GAP)]
GAIN_WORDS = {"better": "above init", "worse": "below init",
              "not distinguishable at this budget": "not distinguishable from init"}
RESOLUTION = 0.015  # the half-width a comparison aims for (points / 100)
BASELINE_ROWS = [("init", "init (untrained, same seed)"), ("pixels", "pixels")]


@dataclass
class Rows:
    """The runs of a report grouped the way every table reads them: per strategy the finished
    runs, and per baseline one result per seed (every strategy of a seed shares it)."""

    strategies: dict[str, list[RunRecord]]
    baselines: dict[str, list[dict]]
    init_by_seed: dict[int, dict]

    @classmethod
    def of(cls, runs: list[RunRecord], strategies: list[str]) -> "Rows":
        ok = {s: [r for r in runs if r.strategy == s and r.error is None] for s in strategies}
        per_seed: dict[str, dict[int, dict]] = {kind: {} for kind, _ in BASELINE_ROWS}
        for r in runs:
            for kind, result in r.results.get("baselines", {}).items():
                per_seed.setdefault(kind, {}).setdefault(r.seed, result)
        # pixels do not depend on the seed: one row from one evaluation
        pixels = list(per_seed.get("pixels", {}).values())[:1]
        baselines = {"init": list(per_seed["init"].values()), "pixels": pixels}
        return cls(ok, baselines, per_seed["init"])

    def baseline_values(self, kind: str, path: tuple[str, ...]) -> list[float]:
        return [v for res in self.baselines[kind] if (v := lookup(res, path)) is not None]

    def gains(self, strategy: str, path: tuple[str, ...]) -> list[float]:
        """Per-seed gain of a strategy over the untrained network of the same seed."""
        out = []
        for r in self.strategies[strategy]:
            value, init = lookup(r.results, path), lookup(self.init_by_seed.get(r.seed, {}), path)
            if value is not None and init is not None:
                out.append(value - init)
        return out

    def gain_interval(self, strategy: str) -> Optional[PairedDifference]:
        """k-NN top-1 gain over init with its 95 % interval: over seeds and the shared test
        images where there are two or more seeds with per-image hits, over seeds alone where
        the hits are missing, else from the test images' sampling error (one run against its
        own init, image by image where both kept their hits)."""
        pairs = [(r, v, i) for r in self.strategies[strategy]
                 if (v := lookup(r.results, KNN_TOP1)) is not None
                 and (i := lookup(self.init_by_seed.get(r.seed, {}), KNN_TOP1)) is not None]
        if len(pairs) >= 2:
            both = two_way_hits([(r.results, self.init_by_seed[r.seed]) for r, _, _ in pairs])
            return both or paired_difference([v for _, v, _ in pairs], [i for _, _, i in pairs])
        if len(pairs) == 1:
            run, value, init = pairs[0]
            if (by_image := hits_difference(run.results, self.init_by_seed[run.seed])):
                return by_image[0]
            n = lookup(run.results, KNN_N)
            return proportion_difference(value, init, int(n)) if n else None
        return None

    def paired(self, strategy: str, reference: str, path: tuple[str, ...]
               ) -> Optional[PairedDifference]:
        ref = {r.seed: v for r in self.strategies[reference] if (v := lookup(r.results, path))
               is not None}
        arm = {r.seed: v for r in self.strategies[strategy] if (v := lookup(r.results, path))
               is not None}
        seeds = sorted(set(ref) & set(arm))
        if not seeds:
            return None
        if path == KNN_TOP1 and len(seeds) >= 2:
            results = {r.seed: r.results for r in self.strategies[strategy]}
            refs = {r.seed: r.results for r in self.strategies[reference]}
            if (both := two_way_hits([(results[s], refs[s]) for s in seeds])) is not None:
                return both
        return paired_difference([arm[s] for s in seeds], [ref[s] for s in seeds])

    def per_seed(self, strategy: str, reference: str
                 ) -> list[tuple[int, PairedDifference, float]]:
        """(seed, k-NN top-1 difference on that seed's test images, share of images one arm
        gets right and the other wrong) for every seed where both arms kept per-image hits."""
        ref = {r.seed: r.results for r in self.strategies[reference]}
        out = []
        for r in sorted(self.strategies[strategy], key=lambda r: r.seed):
            if r.seed in ref and (d := hits_difference(r.results, ref[r.seed])) is not None:
                out.append((r.seed, *d))
        return out


def _metric_rows(rows: Rows, strategies: list[str], paths: list[tuple[str, ...]],
                 gain: Optional[tuple[str, ...]]) -> list[list[str]]:
    """Baseline rows first, then one row per strategy (with its gain over init)."""
    out = []
    for kind, label in BASELINE_ROWS:
        if rows.baselines[kind]:
            out.append([label, *[mean_std(rows.baseline_values(kind, p)) for p in paths],
                        *(["0 (reference)" if kind == "init" else
                           signed([v - i for v, i in zip(rows.baseline_values(kind, gain),
                                                         rows.baseline_values("init", gain))])]
                          if gain else [])])
    for s in strategies:
        out.append([s, *[mean_std(metric_values(rows.strategies[s], p)) for p in paths],
                    *([signed(rows.gains(s, gain))] if gain else [])])
    return out


def paired_table(rows: Rows, strategies: list[str], reference: str = "random") -> Optional[Table]:
    """Each strategy minus ``reference`` per seed: mean, 95 % Student-t interval, verdict."""
    if reference not in strategies:
        return None
    body = []
    for s in strategies:
        if s == reference:
            continue
        for label, path in PAIRED_METRICS:
            d = rows.paired(s, reference, path)
            if d is None:
                continue
            interval = ("—" if d.low is None else
                        f"[{100 * d.low:+.1f}, {100 * d.high:+.1f}]")
            needed = "—"
            if d.std is not None and d.n >= 2:
                needed = seeds_needed(d.std, d.n)
            body.append([s, label, str(d.n), f"{100 * d.mean:+.1f}", interval, d.verdict, needed])
    if not body:
        return None
    return Table(f"Strategy vs {reference}, paired over seeds (points)",
                 ["strategy", "metric", "seeds", "mean difference", "95 % interval", "verdict",
                  f"seeds for ±{100 * RESOLUTION:.1f} (estimate, range)"],
                 body, "Per seed both arms start from identical weights and see the same samples. "
                       "k-NN intervals are two-way where every seed kept per-image hits: the "
                       "per-image differences as seed + test image + residual random effects "
                       "(two-way ANOVA, Satterthwaite t), so they include the sampling error of "
                       "the one test set every seed shares; the other metrics' intervals are "
                       "Student t on the per-seed differences (n - 1 degrees of freedom), which "
                       "leaves that error out. An interval containing 0 is not distinguishable "
                       f"at this budget. Last column: seeds that would narrow the interval to "
                       f"±{100 * RESOLUTION:.1f} points at the spread observed here, an "
                       "estimate: in brackets the same at the ends of that spread's 95 % "
                       "interval.")


def seeds_needed(std: float, n: int) -> str:
    """'N (low-high)': seeds for the resolution at the observed spread and its 95 % range."""
    at, low, high = seeds_for_half_width_range(std, n, RESOLUTION)
    fmt = lambda v: "> 1000" if v is None else str(v)  # noqa: E731
    return f"{fmt(at)} ({fmt(low)}-{fmt(high)})"


def per_seed_table(rows: Rows, strategies: list[str], reference: str = "random"
                   ) -> Optional[Table]:
    """Each seed's k-NN difference measured image by image, and what that says about the spread
    over seeds: how much of it the test images explain, and how many images would reach the
    resolution goal with the seeds there are."""
    if reference not in strategies:
        return None
    body, notes = [], []
    for s in strategies:
        if s == reference:
            continue
        per_seed = rows.per_seed(s, reference)
        adjusted = holm([normal_p(d) for _, d, _ in per_seed])
        body += [[s, str(seed), f"{100 * d.mean:+.2f}",
                  f"[{100 * d.low:+.2f}, {100 * d.high:+.2f}]", f"{p:.3f}",
                  f"{100 * discordant:.1f}"]
                 for (seed, d, discordant), p in zip(per_seed, adjusted)]
        if len(per_seed) >= 2:
            notes.append(_spread_note(s, [d for _, d, _ in per_seed],
                                      int(lookup(rows.strategies[s][0].results, KNN_N) or 0)))
            notes.append(_heterogeneity_note(s, [d for _, d, _ in per_seed]))
    if not body:
        return None
    return Table(f"Strategy vs {reference}, per seed: k-NN top-1 on the same test images (points)",
                 ["strategy", "seed", "difference", "95 % interval from the test images",
                  "Holm-adjusted p", "right in one, wrong in the other (%)"], body,
                 "Each row holds both trained networks of one seed fixed: its interval is the "
                 "test images' sampling error alone (normal approximation on the per-image "
                 "differences), not a verdict on the strategies; its p-value is adjusted for "
                 "the seeds tested together (Holm). " + " ".join(notes))


def _heterogeneity_note(strategy: str, per_seed: list[PairedDifference]) -> str:
    if any(not d.se for d in per_seed):  # Q weighs each seed by 1 / se^2
        return (f"{strategy}: Cochran's Q is not defined here: in a seed where both networks "
                "got the same test images right, the difference has no sampling error to "
                "weigh it by.")
    q, p = cochran_q(per_seed)
    same = "consistent with one true difference" if p >= 0.05 else "differ beyond their noise"
    return (f"{strategy}: Cochran's Q = {q:.1f} on {len(per_seed) - 1} degrees of freedom "
            f"(p = {p:.3f}): the seeds' differences are {same}.")


def _spread_note(strategy: str, per_seed: list[PairedDifference], images: int) -> str:
    split, n = split_spread(per_seed), len(per_seed)
    floor = t_quantile(0.95, n - 1) * split.training / math.sqrt(n)
    needed = images_for_half_width(split, n, images, RESOLUTION) if images else None
    more = (f"{needed:,} test images would bring it to ±{100 * RESOLUTION:.1f} with these seeds"
            if needed is not None else f"no number of test images brings it to "
            f"±{100 * RESOLUTION:.1f} with these seeds")
    return (f"{strategy}: the {n} per-seed differences spread by {100 * split.total:.2f} points "
            f"(std); the test images' sampling explains {100 * split.test_images:.2f} of it and "
            f"how the training runs went {100 * split.training:.2f}, so with an unlimited test "
            f"set the interval over these seeds would still be ±{100 * floor:.1f}; {more}.")


def takeaways(rows: Rows, strategies: list[str]) -> list[str]:
    """What a reader should take away, in words, before the tables."""
    lines = []
    init, pixels = rows.baseline_values("init", KNN_TOP1), rows.baseline_values("pixels", KNN_TOP1)
    ref = f"untrained network {mean_std(init)} %" if init else "untrained network"
    ref += f", raw pixels {mean_std(pixels)} %" if pixels else ""
    judged = [(s, d) for s in strategies if (d := rows.gain_interval(s)) is not None]
    if judged:
        basis = {d.basis for _, d in judged}
        words = {"seeds x test images": "over seeds and the shared test images",
                 "seeds": "over seeds alone",
                 "test images": "from the test images' sampling error alone (one seed)"}
        where = " or ".join(words[b] for b in sorted(basis, key=list(words).index))
        lines.append("Learning: k-NN top-1 gain over the untrained network of the same seed "
                     f"(points, 95 % interval {where}): "
                     + "; ".join(f"{s} {100 * d.mean:+.1f} [{100 * d.low:+.1f}, {100 * d.high:+.1f}]"
                                 f" {GAIN_WORDS[d.verdict]}" for s, d in judged)
                     + f" ({ref}).")
    elif gains := [f"{s} {signed(rows.gains(s, KNN_TOP1))}" for s in strategies
                   if rows.gains(s, KNN_TOP1)]:
        lines.append(f"Learning: k-NN top-1 gain over the untrained network of the same seed "
                     f"(points): {', '.join(gains)} ({ref}).")
    verdicts = []
    for s in strategies:
        d = rows.paired(s, "random", KNN_TOP1) if s != "random" and "random" in strategies else None
        if d is not None:  # with its interval and seed count: the lead is what gets quoted
            interval = "" if d.low is None else \
                f" [{100 * d.low:+.1f}, {100 * d.high:+.1f}] over {d.n} seeds"
            verdicts.append(f"{s} {100 * d.mean:+.1f}{interval} ({d.verdict})")
    if verdicts:
        lines.append(f"Against random masking, k-NN top-1 paired over seeds: {'; '.join(verdicts)}.")
    if "attmask_high" in strategies:
        masked = metric_values(rows.strategies["attmask_high"], ("attention", "masked_on_object"))
        share = metric_values(rows.strategies["attmask_high"], ("attention", "object_share"))
        if masked and share:
            # whichever way it goes: a teacher that attends to the background hides it instead
            more = "more" if np.mean(masked) > np.mean(share) else "less"
            lines.append(f"AttMask-High hides {more} of the object than random masking: "
                         f"{mean_std(masked)} % of its masked patches lie on the object, against "
                         f"an object share of {mean_std(share)} % of all patches (what random "
                         f"masking hides on average).")
    return lines


def build_tables(runs: list[RunRecord], strategies: list[str]) -> list[Table]:
    rows = Rows.of(runs, strategies)
    tables = [Table("k-NN on the teacher's [CLS] (k = 20, T = 0.07), %",
                    ["model", "top-1", "top-5", "gain over init (points)"],
                    _metric_rows(rows, strategies, [KNN_TOP1, KNN_TOP5], KNN_TOP1))]
    if (paired := paired_table(rows, strategies)) is not None:
        tables.append(paired)
    if (per_seed := per_seed_table(rows, strategies)) is not None:
        tables.append(per_seed)
    tables += [
        Table("Linear probe (last 4 blocks, epoch chosen on a validation split), %",
              ["model", "test top-1", "val top-1", "gain over init (points)"],
              _metric_rows(rows, strategies, [LINEAR_TOP1, LINEAR_VAL_TOP1], LINEAR_TOP1)),
        Table("Few-shot k-NN (nu images per class; 1-NN for nu = 1, else 20-NN; 5 splits), %",
              ["model", *[f"nu={nu}" for nu in FEWSHOT]],
              _metric_rows(rows, strategies, [("fewshot", nu, "mean") for nu in FEWSHOT], None),
              "— : no value yet (the run has not finished) or the data has too few images per "
              "class for 5 disjoint splits"),
    ]
    variants = sorted({v for r in runs for v in r.results.get("robustness", {}).get("variants", {})})
    if variants:
        tables.append(Table("Background robustness (linear probe fit on the original training "
                            "split), %; BG-gap = mixed_same - mixed_rand",
                            ["model", *variants, "BG-gap"],
                            _metric_rows(rows, strategies,
                                         [*[("robustness", "variants", v) for v in variants],
                                          BG_GAP], None)))
    if any("attention" in r.results for r in runs):
        tables.append(Table("Attention on the object, % of patches on the foreground",
                            ["strategy", "top-10% attended", "AttMask-High masked", "all patches"],
                            [[s, mean_std(metric_values(rows.strategies[s], ("attention", "topk_on_object"))),
                              mean_std(metric_values(rows.strategies[s], ("attention", "masked_on_object"))),
                              mean_std(metric_values(rows.strategies[s], ("attention", "object_share")))]
                             for s in strategies]))
    tables.append(Table("Cost per run", ["run", "pretraining (s)", "evaluation (s)",
                                         "train images/s", "device", "registered model",
                                         "status"],
                        [[r.run_name, f"{r.train_s:.0f}" if r.train_s else "—",
                          f"{r.eval_s:.0f}" if r.eval_s else "—", f"{r.images_per_s:.1f}",
                          r.device, r.model_version or "-", "failed: " + r.error if r.error else
                          ("reused (finished earlier)" if r.skipped else "ok")] for r in runs],
                        note="Pretraining: the training steps over every session the run took "
                             "(a resumed run's earlier sessions included; start-up and the "
                             "online monitor not counted), and the images/s they ran at. Each "
                             "run's teacher backbone is a version of the registered model "
                             "(`mlflow.artifacts.download_artifacts('models:/NAME/VERSION')`)."))
    return tables


@dataclass
class Report:
    title: str
    intro: list[str]
    tables: list[Table]
    figures: list[tuple[str, str, bytes]]  # (file name, caption, png)

    def markdown(self) -> str:
        lines = [f"# {self.title}", ""]
        for paragraph in self.intro:
            lines += [paragraph, ""]
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
        # the monitor's own step-0 score: the same bank and test images as the curves
        init = [h[0][1] for h in histories.values() if h[0][0] == 0]
        hlines = {"init (untrained)": statistics.fmean(init)} if init else None
        figures.append(("online_knn.png", "Online k-NN top-1 of the teacher during pretraining",
                        line_chart_png(histories, "online k-NN (k=20) during pretraining", "epoch",
                                       "top-1", hlines)))
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
