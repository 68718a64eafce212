"""The end-to-end benchmark: prepare data -> pretrain each strategy x seed -> evaluate each ->
aggregate -> report, in one Ray session, tracked as an MLflow parent run with one child run per
(strategy, seed).

Run names derive from a hash of what the runs share (data, evaluation, the resolved configuration
but its strategy and seed), so running the same benchmark again, or with more seeds or
strategies, reuses every run that already finished and does only the rest. A finished run is found in
MLflow or, where that store is gone (another machine, a fresh clone), in the ``record.json`` it
left in the report folder, so a report folder that is copied or committed carries its finished
runs with it. A failed run is shown in the report and makes the command exit non-zero.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import shutil
import statistics
import tempfile
import time
import traceback
from collections import Counter
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Optional

from attmask import __version__, masking
from attmask.config import (
    LATER_KEYS,
    PRESET_DIR,
    Config,
    config_source,
    load_config,
    parse_override,
    read_yaml,
)
from attmask.data.prepare import PrepareArgs
from attmask.data.shards import load_dataset
from attmask.errors import ConfigError, UserError, check_output_dir
from attmask.eval.baselines import BASELINES
from attmask.eval.results import KNN_TOP1, LINEAR_TOP1, lookup
from attmask.eval.sequential import Decision, SequentialPlan, decide
from attmask.eval.suite import DEFAULT_SUITE, EvalOptions
from pipelines.faults import FaultInjection
from pipelines.report import (
    Report,
    Rows,
    RunRecord,
    Table,
    build_figures,
    build_tables,
    metric_values,
    takeaways,
)
from pipelines.evaluate import EVALUATES_TAG, OPTIONS_TAG, options_digest
from pipelines.tracking import RUN_NAME_TAG, Tracker, code_digest, git_commit

BENCH_DIR = PRESET_DIR / "benchmark"
TOP_KEYS = {"description", "smoke", "data", "preset", "overrides", "strategies", "seeds",
            "evaluation", "resolve", "max_seeds"}
DATA_KEYS = {"source", "from", "out", "path", "num_samples", "num_test_samples", "per_class",
             "image_size", "seed", "colours", "num_variant_samples", "val_fraction",
             "val_per_class"}
EVAL_KEYS = {"suite", "probe_epochs", "max_train", "max_test", "max_attention",
             "finetune_epochs"}
DONE_TAG = "attmask.benchmark_done"
RECORD_FILE = "record.json"  # a finished run, beside its evaluation in the report folder
REPORT_ROOT = Path("reports")  # reports/<benchmark name>/ unless --reports says otherwise


@dataclass
class BenchmarkSpec:
    name: str
    description: str
    smoke: bool
    data: dict[str, Any]
    preset: str
    overrides: dict[str, Any]
    strategies: list[str]
    seeds: list[int]
    evaluation: dict[str, Any]
    configs: dict[tuple[str, int], Config] = field(default_factory=dict)
    digest: str = ""
    cli_overrides: list[str] = field(default_factory=list)
    cli_flags: list[str] = field(default_factory=list)  # --seeds / --strategies, as given
    # resolve: add seeds until each strategy-vs-reference comparison is decided
    sequential: Optional[SequentialPlan] = None
    run_overrides: dict[str, Any] = field(default_factory=dict)  # every run's, but seed/strategy

    def add_run(self, strategy: str, seed: int) -> Config:
        """The config of one more (strategy, seed) run, named like every other."""
        cfg = load_config(path=config_source(self.preset), overrides={
            **self.run_overrides, "masking.strategy": strategy, "train.seed": seed})
        cfg.train.run_name = self.run_name(strategy, seed)
        self.configs[(strategy, seed)] = cfg
        if seed not in self.seeds:
            self.seeds.append(seed)
        return cfg

    def command(self, report_root: str | Path = REPORT_ROOT) -> str:
        """The command line that reruns (or continues) this benchmark into the same folder."""
        reports = [] if Path(report_root) == REPORT_ROOT else ["--reports", str(report_root)]
        return " ".join(["python run_pipeline.py benchmark --preset", self.name, *reports,
                         *self.cli_flags, *self.cli_overrides])

    @property
    def bench_name(self) -> str:
        return f"bench-{self.name}-{self.digest}"

    def run_name(self, strategy: str, seed: int) -> str:
        return f"{self.bench_name}-{strategy}-s{seed}"

    @property
    def data_dir(self) -> str:
        return str(self.data.get("path") or self.data["out"])

    def prepare_args(self) -> Optional[PrepareArgs]:
        """What ``prepare-data`` is asked to write, or None when ``data.path`` names shards."""
        d = self.data
        if d.get("path"):
            return None
        return PrepareArgs(source=d["source"], out=d["out"], from_path=d.get("from"),
                           num_samples=d.get("num_samples"),
                           num_test_samples=d.get("num_test_samples"),
                           per_class=d.get("per_class"), image_size=d.get("image_size"),
                           seed=d.get("seed", 0), colours=d.get("colours", "random"),
                           num_variant_samples=d.get("num_variant_samples"),
                           val_fraction=d.get("val_fraction"),
                           val_per_class=d.get("val_per_class"))

    def eval_options(self) -> EvalOptions:
        e = self.evaluation
        options = EvalOptions(probe_epochs=e.get("probe_epochs", 100),
                              max_train_samples=e.get("max_train"),
                              max_test_samples=e.get("max_test"),
                              max_attention_samples=e.get("max_attention"),
                              finetune_epochs=e.get("finetune_epochs", 3))
        if "suite" in e:
            options.suite = e["suite"]
        return options


def load_benchmark(preset: str, cli_overrides: Optional[list[str]] = None, *,
                   seeds: Optional[list[int]] = None,
                   strategies: Optional[list[str]] = None,
                   resolve: Optional[float] = None,
                   max_seeds: Optional[int] = None) -> BenchmarkSpec:
    """Read ``configs/benchmark/PRESET.yaml`` (or a path to such a file) and resolve + validate
    every run's config. ``seeds`` and ``strategies`` replace the preset's lists (``--seeds``,
    ``--strategies``): runs already finished under the same preset are kept."""
    path = Path(preset) if preset.endswith((".yaml", ".yml")) else BENCH_DIR / f"{preset}.yaml"
    preset = path.stem
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in BENCH_DIR.glob("*.yaml")))
        raise ConfigError(f"benchmark preset {preset!r} not found ({path}); available: {known}")
    raw = read_yaml(path)
    for where, keys, allowed in (("", raw, TOP_KEYS), ("data.", raw.get("data") or {}, DATA_KEYS),
                                 ("evaluation.", raw.get("evaluation") or {}, EVAL_KEYS)):
        unknown = sorted(set(keys) - allowed)
        if unknown:
            raise ConfigError(f"{path}: unknown key {where}{unknown[0]}; allowed: "
                              f"{', '.join(sorted(allowed))}")
    data = dict(raw.get("data") or {})
    cli = dict(parse_override(o) for o in cli_overrides or [])
    if cli.get("data.path"):  # the runs and their evaluation must read the same data
        data = {"path": str(cli["data.path"])}
    if not data.get("path") and not (data.get("source") and data.get("out")):
        raise ConfigError(f"{path}: data needs either path (existing shards) or source and out")
    flags = [*(["--seeds", ",".join(map(str, seeds))] if seeds else []),
             *(["--strategies", ",".join(strategies)] if strategies else []),
             *(["--resolve", f"{resolve:g}"] if resolve is not None else []),
             *(["--max-seeds", str(max_seeds)] if max_seeds is not None else [])]
    where = "--strategies" if strategies else f"{path}: strategies"
    strategies = strategies or raw.get("strategies") or list(masking.available())
    for s in strategies:
        if s not in masking.available():
            raise ConfigError(f"{where}: unknown {s!r}; available: "
                              f"{', '.join(masking.available())}")
    if len(set(strategies)) < len(strategies):
        raise ConfigError(f"{where}: each strategy once, got {', '.join(strategies)}")
    seeds = seeds or raw.get("seeds") or [0]
    if not all(isinstance(s, int) for s in seeds) or len(set(seeds)) < len(seeds):
        raise ConfigError(f"{path}: seeds must be distinct integers, got {seeds}")
    swept = {"masking.strategy": f"--strategies or strategies in {path}",
             "train.seed": f"--seeds or seeds in {path}",
             "train.run_name": "the benchmark's own run names"}
    for key in [parse_override(o)[0] for o in cli_overrides or []] + list(raw.get("overrides") or {}):
        if key in swept:
            raise ConfigError(f"override {key}: the benchmark sets it per run (use {swept[key]} "
                              "instead)")
    sequential = sequential_plan(path, raw, seeds, resolve, max_seeds)
    model_preset = raw.get("preset", "tiny-cpu")
    spec = BenchmarkSpec(preset, raw.get("description", preset), bool(raw.get("smoke", False)),
                         data, model_preset, dict(raw.get("overrides") or {}),
                         strategies, seeds, dict(raw.get("evaluation") or {}),
                         cli_overrides=list(cli_overrides or []), cli_flags=flags,
                         sequential=sequential)
    # Everything a real run would reject later, rejected now (dry run or not).
    for where, check in (("data", spec.prepare_args), ("evaluation", spec.eval_options)):
        try:
            if (built := check()) is not None:
                built.validate()
        except UserError as exc:
            hint = ""
            if where == "data" and data.get("from") and not Path(data["from"]).exists():
                hint = (f"; with a copy elsewhere, write its shards with `prepare-data --source "
                        f"{data['source']} --from YOUR_COPY --out DIR` and pass data.path=DIR")
            raise ConfigError(f"{path}: {where}: {exc}{hint}") from exc
    spec.run_overrides = {**spec.overrides, "data.path": str(Path(spec.data_dir)), **cli}
    source = config_source(model_preset)
    for seed in seeds:  # seed-major: an interrupted benchmark has complete pairs to compare
        for strategy in strategies:
            spec.configs[(strategy, seed)] = load_config(path=source, overrides={
                **spec.run_overrides, "masking.strategy": strategy, "train.seed": seed})
    # The digest covers what every run shares, not the lists of strategies and seeds: a
    # benchmark given more seeds or strategies keeps the runs it has finished.
    shared = next(iter(spec.configs.values())).to_dict()
    del shared["masking"]["strategy"], shared["train"]["seed"]
    for dotted, before in LATER_KEYS.items():
        section, key = dotted.split(".")
        if shared[section][key] == before:
            del shared[section][key]
    resolved = {"data": data, "evaluation": spec.evaluation, "config": shared}
    spec.digest = hashlib.sha256(json.dumps(resolved, sort_keys=True, default=str)
                                 .encode()).hexdigest()[:8]
    for (strategy, seed), cfg in spec.configs.items():
        cfg.train.run_name = spec.run_name(strategy, seed)
    return spec


def sequential_plan(path: Path, raw: dict, seeds: list[int], resolve: Optional[float],
                    max_seeds: Optional[int]) -> Optional[SequentialPlan]:
    """The plan of ``--resolve MARGIN --max-seeds N`` (or ``resolve:`` / ``max_seeds:`` in the
    file), or None for a fixed list of seeds."""
    margin = resolve if resolve is not None else raw.get("resolve")
    most = max_seeds if max_seeds is not None else raw.get("max_seeds")
    if margin is None:
        if most is not None:
            raise ConfigError(f"max_seeds={most}: only with resolve (--resolve MARGIN)")
        return None
    if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not margin > 0:
        raise ConfigError(f"resolve={margin!r}: a margin in points > 0, e.g. 1.0")
    most = 10 if most is None else most
    if isinstance(most, bool) or not isinstance(most, int) or most < max(2, len(seeds)):
        raise ConfigError(f"max_seeds={most!r}: an integer >= 2 and >= the {len(seeds)} "
                          f"seed(s) given ({path})")
    return SequentialPlan(margin=float(margin), min_seeds=2, max_seeds=most)


def sequential_decisions(runs: list[RunRecord], strategies: list[str],
                         plan: SequentialPlan) -> dict[str, list[Decision]]:
    """For each strategy against the reference (the first one): the decision after each seed
    of its paired k-NN top-1 differences (points), in seed order."""
    finished = [r for r in runs if not r.error]
    knn = {(r.strategy, r.seed): lookup(r.results, KNN_TOP1) for r in finished}
    rows = Rows.of(finished, strategies)
    reference, decisions = strategies[0], {}
    for strategy in strategies[1:]:
        seeds = sorted(seed for (s, seed), v in knn.items() if s == strategy and v is not None
                       and knn.get((reference, seed)) is not None)
        diffs = [100 * (knn[(strategy, seed)] - knn[(reference, seed)]) for seed in seeds]
        # the test images' own sampling error of each seed's difference, where hits were kept
        errors = [100 * d.se for _, d, _ in rows.per_seed(strategy, reference)]
        floor = math.sqrt(statistics.fmean(e * e for e in errors)) if errors else 0.0
        decisions[strategy] = [decide(diffs[:n], plan, floor)
                               for n in range(1, len(diffs) + 1)] or [decide([], plan)]
    return decisions


def next_round(spec: BenchmarkSpec, runs: list[RunRecord]) -> list[str]:
    """The strategies the sequential plan gives one more seed (the reference comes first when
    any does); empty when every comparison is decided or the seeds are spent."""
    if spec.sequential is None or len(spec.seeds) >= spec.sequential.max_seeds:
        return []
    pending = [s for s, history in sequential_decisions(runs, spec.strategies,
                                                        spec.sequential).items()
               if history[-1].more]
    return [spec.strategies[0], *pending] if pending else []


def plan(spec: BenchmarkSpec, report_root: str | Path = REPORT_ROOT) -> str:
    first = next(iter(spec.configs.values()))
    data = spec.data.get("path") or f"{spec.data['source']} -> {spec.data['out']}"
    return "\n".join([
        f"benchmark {spec.bench_name}: {spec.description}",
        f"data: {data}",
        f"model: {spec.preset} ({first.model.arch}, depth {first.model.dims[1]}, "
        f"{first.model.image_size} px), {first.train.epochs} epochs, "
        f"{first.ray.num_workers} worker(s) per run",
        f"runs: {len(spec.configs)} = strategies {', '.join(spec.strategies)} x seeds "
        f"{spec.seeds}" + (
            f"; then one more seed at a time for each comparison with {spec.strategies[0]} "
            f"not yet decided within +-{spec.sequential.margin:g} points (k-NN top-1), up to "
            f"{spec.sequential.max_seeds} seeds" if spec.sequential else ""),
        f"evaluation: {', '.join(spec.evaluation.get('suite', DEFAULT_SUITE))}",
        f"report: {Path(report_root) / spec.name}/report.md and report.html"])


@dataclass
class BenchmarkResult:
    runs: list[RunRecord]
    report_md: Path
    report_html: Path
    parent_run_id: str
    wall_s: float

    @property
    def failed(self) -> list[RunRecord]:
        return [r for r in self.runs if r.error]


def run_benchmark(spec: BenchmarkSpec, *, address: Optional[str] = None,
                  report_root: str | Path = REPORT_ROOT, fault: Optional[FaultInjection] = None,
                  allow_mixed_code: bool = False,
                  log: Callable[[str], None] = print) -> BenchmarkResult:
    from attmask.data.prepare import prepare_data
    from pipelines.ray_session import ray_session

    start = time.perf_counter()
    report_dir = Path(report_root) / spec.name
    commit = git_commit(ignore=report_dir)  # the code these runs run, before any report is written
    first = next(iter(spec.configs.values()))
    claim_report_folder(spec, report_dir)
    tracker = Tracker.connect(first)  # an unreachable store fails before any data is written
    if not allow_mixed_code:
        check_same_code(spec, tracker, report_dir, code_digest())
    if (prepare := spec.prepare_args()) is not None:
        _, written = prepare_data(prepare)
        log(f"data: {'prepared' if written else 'reused'} {prepare.out}")
    runs: list[RunRecord] = []
    workers = math.ceil(first.ray.num_workers * first.ray.cpus_per_worker)
    options_key = options_digest(spec.eval_options(), BASELINES, load_dataset(spec.data_dir),
                                 None)  # the evaluation this benchmark reads, and no other
    with ray_session(address, num_cpus=workers):
        parent = tracker.open_run(first, spec.bench_name,  # it covers every strategy
                                  tags={"kind": "benchmark", "benchmark": spec.name,
                                        "strategy": ",".join(spec.strategies)})
        trained_s: list[float] = []  # wall time of each run trained by this invocation
        queue = list(spec.configs)
        while queue:
            strategy, seed = queue.pop(0)
            log(progress_line(len(runs), len(spec.configs), strategy, seed,
                              time.perf_counter() - start, trained_s))
            run_start = time.perf_counter()
            record = _one_run(spec, strategy, seed, spec.configs[(strategy, seed)], tracker,
                              parent, report_dir, fault, log, commit, options_key)
            runs.append(record)
            if not (record.skipped or record.error):
                trained_s.append(time.perf_counter() - run_start)
            if not queue and (more := next_round(spec, runs)):  # the sequential plan's round
                seed = max(spec.seeds) + 1
                log(f"seed {seed} for {', '.join(more[1:])} (not decided yet) and "
                    f"{more[0]}, its reference")
                for strategy in more:
                    spec.add_run(strategy, seed)
                    queue.append((strategy, seed))
            if queue:  # a long benchmark shows what it has so far
                make_report(spec, runs, time.perf_counter() - start, report_root,
                            commit).write(report_dir)
    wall = time.perf_counter() - start
    report = make_report(spec, runs, wall, report_root, commit)
    md, page = report.write(report_dir)
    _log_report(tracker, parent, report_dir, runs)
    log(f"report: {md} and {page} ({wall:.0f}s)")
    return BenchmarkResult(runs, md, page, parent, wall)


IDENTITY_FILE = "benchmark.json"  # which benchmark (name and digest) a report folder belongs to


def claim_report_folder(spec: BenchmarkSpec, report_dir: Path, write: bool = True) -> None:
    """A report folder holds one benchmark: the one whose digest its ``benchmark.json`` names
    (or, for folders written before that file, its records' run names). Another benchmark's
    runs would overwrite its records and report, so it is refused, with nothing touched; a
    record that cannot be read is named, never silently trained over."""
    check_output_dir(report_dir, "--reports")  # also names a --reports that is a file
    owners = set()
    identity = report_dir / IDENTITY_FILE
    if identity.is_file():
        try:
            owners.add(json.loads(identity.read_text())["digest"])
        except (ValueError, KeyError, TypeError) as exc:
            raise UserError(f"{identity}: not a benchmark identity file ({exc.__class__.__name__}"
                            "); move it aside or restore it") from None
    for record in sorted(report_dir.glob(f"runs/*/{RECORD_FILE}")):
        try:
            name = json.loads(record.read_text())["run_name"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise UserError(f"{record}: unreadable run record ({exc.__class__.__name__}); its "
                            "run is not redone over it: restore it from version control, or "
                            "move the run's folder aside to train that run again") from None
        prefix = f"bench-{spec.name}-"
        if isinstance(name, str) and name.startswith(prefix):
            owners.add(name[len(prefix):].split("-", 1)[0])
    others = owners - {spec.digest}
    if others:
        raise UserError(f"--reports {report_dir.parent}: {report_dir} holds benchmark {spec.name} "
                        f"with digest {', '.join(sorted(others))}, and this one's configuration "
                        f"has digest {spec.digest}; its runs would be overwritten: give this "
                        "benchmark another --reports folder")
    if not write:
        return
    report_dir.mkdir(parents=True, exist_ok=True)
    if not identity.is_file():
        identity.write_text(json.dumps({"name": spec.name, "digest": spec.digest}) + "\n")


def check_same_code(spec: BenchmarkSpec, tracker: Tracker, report_dir: Path, code: str) -> None:
    """Refuse to pair runs that different code trained: a paired difference would then mix a
    code change into the strategies' difference. Finished runs must share one code digest, and
    where runs are still to train, it must be this checkout's (a benchmark whose runs are all
    finished only rebuilds its report, with whatever report code this checkout has)."""
    finished: dict[str, tuple[str, str]] = {}  # run name -> (code digest, commit)
    pending = []
    for (strategy, seed), cfg in spec.configs.items():
        name = cfg.train.run_name
        found = tracker.find_run({RUN_NAME_TAG: name, DONE_TAG: "true"})
        if found is not None:
            finished[name] = (found.data.tags.get("code_digest", ""),
                              found.data.tags.get("git_commit", "unknown"))
            continue
        try:
            saved = json.loads((report_dir / "runs" / f"{strategy}-s{seed}" / RECORD_FILE)
                               .read_text())
        except (OSError, ValueError):
            saved = {}
        if saved.get("run_name") == name:
            finished[name] = (saved.get("code_digest", ""), saved.get("commit") or "unknown")
        else:
            pending.append(name)
    digests = {digest for digest, _ in finished.values()}
    if pending:
        digests.add(code)
    if len(digests) <= 1:
        return
    name, (theirs, commit) = next((n, v) for n, v in finished.items()
                                  if v[0] != (code if pending else next(iter(finished.values()))[0]))
    raise UserError(
        f"benchmark {spec.name}: finished run {name} was trained by other code (code "
        f"{theirs or 'not recorded'}, commit {commit}) than "
        + (f"this checkout's (code {code}), which would train {len(pending)} more run(s)"
           if pending else "the other finished runs")
        + "; pairing them would mix a code change into the comparison: use a new --reports "
        "folder, or --allow-mixed-code to pair them anyway")


def rebuild_report(spec: BenchmarkSpec, report_root: str | Path = REPORT_ROOT,
                   log: Callable[[str], None] = print) -> BenchmarkResult:
    """Write the report again from the finished runs' records in the report folder alone (no
    data, Ray or MLflow): a report rendered by newer report code, or a folder copied from
    another machine. Runs without a record are left out and the report says it is partial."""
    report_dir = Path(report_root) / spec.name
    claim_report_folder(spec, report_dir, write=False)
    runs = []
    for (strategy, seed), cfg in spec.configs.items():
        record = RunRecord(strategy, seed, cfg.train.run_name)
        if _reuse_record(report_dir / "runs" / f"{strategy}-s{seed}", record):
            runs.append(record)
    if not runs:
        raise UserError(f"--report-only: {report_dir} holds no finished run of benchmark "
                        f"{spec.bench_name}")
    md, page = make_report(spec, runs, 0.0, report_root,
                           git_commit(ignore=report_dir)).write(report_dir)
    log(f"report: {md} and {page} from {len(runs)} finished run(s)")
    return BenchmarkResult(runs, md, page, "", 0.0)


def progress_line(index: int, total: int, strategy: str, seed: int, elapsed_s: float,
                  trained_s: list[float]) -> str:
    """The job's position ("run 3 of 6") and, once this invocation has trained a run, the time
    left at the mean of those runs (runs finished earlier are reused in seconds, so it is an
    upper estimate)."""
    line = f"run {index + 1} of {total}: {strategy} seed {seed}; {elapsed_s / 60:.0f} min so far"
    if trained_s:
        left = (total - index) * sum(trained_s) / len(trained_s)
        line += f", about {left / 60:.0f} min left for the {total - index} run(s) to go"
    return line


def _one_run(spec: BenchmarkSpec, strategy: str, seed: int, cfg: Config, tracker: Tracker,
             parent: str, report_dir: Path, fault: Optional[FaultInjection],
             log: Callable[[str], None], commit: str = "unknown",
             options_key: str = "") -> RunRecord:
    from pipelines.evaluate import run_evaluate
    from pipelines.pretrain import run_pretrain

    record = RunRecord(strategy, seed, cfg.train.run_name, commit=commit,
                       code_digest=code_digest())
    out = report_dir / "runs" / f"{strategy}-s{seed}"
    if _reuse_finished(tracker, record, options_key):
        _carry_run(tracker, record, out)
        log(f"{record.run_name}: finished earlier, reused")
        return record
    if _reuse_record(out, record):
        log(f"{record.run_name}: finished earlier, reused")
        return record
    run_start = time.perf_counter()
    try:
        log(f"{record.run_name}: pretraining")
        trained = run_pretrain(cfg, parent_run_id=parent, fault=fault, log=log)
        record.mlflow_run_id, record.model_version = trained.mlflow_run_id, trained.model_version
        # the trainer's clock survives resumes; its last images/s covers only the last session
        record.train_s = float(trained.metrics.get("train_s", 0.0))
        images = trained.steps * cfg.train.batch_size_per_worker * cfg.ray.num_workers
        record.images_per_s = images / record.train_s if record.train_s else \
            float(trained.metrics.get("images_per_s", 0.0))
        record.device = trained.device
        log(f"{record.run_name}: evaluating")
        record.results = run_evaluate(cfg, data=spec.data_dir, mlflow_run=trained.mlflow_run_id,
                                      out_dir=str(out), options=spec.eval_options(), log=log,
                                      canonical=True)
        overlay = out / "attention_overlay.png"
        record.overlay_png = overlay.read_bytes() if overlay.is_file() else None
        record.knn_history = _knn_history(tracker, trained.mlflow_run_id)
        record.wall_s = time.perf_counter() - run_start
        tracker.set_tags(record.mlflow_run_id, {
            DONE_TAG: "true", "cost.wall_s": f"{record.wall_s:.1f}",
            "cost.images_per_s": f"{record.images_per_s:.2f}", "cost.device": record.device})
        _write_record(out, record)
    except Exception as exc:  # noqa: BLE001 - one failed run must not stop the others
        record.error = f"{exc.__class__.__name__}: {str(exc).strip().splitlines()[-1][:300]}" \
            if str(exc).strip() else exc.__class__.__name__
        record.wall_s = time.perf_counter() - run_start
        log(f"{record.run_name}: FAILED {record.error}")
        if not isinstance(exc, UserError):
            log(traceback.format_exc(limit=5))
    return record


def _knn_history(tracker: Tracker, run_id: str) -> list[tuple[float, float]]:
    """(epoch, online k-NN top-1) at the end of each epoch the monitor ran."""
    epoch_end: dict[int, int] = {}
    for step, epoch in tracker.metric_history(run_id, "epoch"):
        epoch_end[int(epoch)] = max(epoch_end.get(int(epoch), 0), step)
    knn = dict(tracker.metric_history(run_id, "knn_top1"))
    return [(epoch, knn[step]) for epoch, step in sorted(epoch_end.items()) if step in knn]


def _reuse_finished(tracker: Tracker, record: RunRecord, options_key: str) -> bool:
    """Fill ``record`` from MLflow when this run already finished and was evaluated the way
    this benchmark evaluates (an ad-hoc evaluation of the same checkpoint is another run)."""
    run = tracker.find_run({RUN_NAME_TAG: record.run_name, DONE_TAG: "true"})
    if run is None:
        return False
    evaluation = tracker.find_run({EVALUATES_TAG: run.info.run_id, OPTIONS_TAG: options_key})
    if evaluation is None:
        return False
    run_id = record.mlflow_run_id = run.info.run_id
    record.evaluation_run_id = evaluation.info.run_id
    record.skipped = True
    with tempfile.TemporaryDirectory() as d:
        fetched = tracker.fetch(evaluation.info.run_id, "eval/results.json", d)
        if fetched is not None:
            record.results = json.loads(fetched.read_text())
        overlay = tracker.fetch(evaluation.info.run_id, "eval/attention_overlay.png", d)
        if overlay is not None:
            record.overlay_png = overlay.read_bytes()
    record.wall_s = float(run.data.tags.get("cost.wall_s", 0))
    record.train_s = float(run.data.metrics.get("train_s", 0))  # the last step's clock
    record.images_per_s = float(run.data.tags.get("cost.images_per_s", 0))
    record.device = run.data.tags.get("cost.device", "")
    record.model_version = run.data.tags.get("model_version", "")
    record.commit = run.data.tags.get("git_commit", "")
    record.code_digest = run.data.tags.get("code_digest", "")
    record.knn_history = _knn_history(tracker, run_id)
    return True


def _carry_run(tracker: Tracker, record: RunRecord, out: Path) -> None:
    """Write a run reused from MLflow into a report folder that does not hold it yet (another
    ``--reports``): its evaluation files, then its record, so that the folder alone carries the
    run to a fresh store as a report folder of its own runs does."""
    try:
        if json.loads((out / RECORD_FILE).read_text()).get("run_name") == record.run_name:
            return
    except (OSError, ValueError):
        pass
    with tempfile.TemporaryDirectory() as d:
        logged = tracker.fetch(record.evaluation_run_id or record.mlflow_run_id, "eval", d)
        if logged is None or not (logged / "results.json").is_file():
            return  # nothing to carry: the folder keeps what it has
        out.mkdir(parents=True, exist_ok=True)
        for f in logged.iterdir():
            if f.is_file() and f.name != "results.json":
                shutil.copyfile(f, out / f.name)
    # as the evaluation writes it once logged: with the run that holds it
    record.results = {**record.results,
                      "mlflow_run_id": record.evaluation_run_id or record.mlflow_run_id}
    (out / "results.json").write_text(json.dumps(record.results, indent=1))
    _write_record(out, record)


def _write_record(out: Path, record: RunRecord) -> None:
    """Everything the report needs of a finished run but its evaluation (``results.json``) and
    overlay, which lie beside it; written last and atomically, so it exists only for a run that
    finished."""
    saved = {k: v for k, v in asdict(record).items()
             if k not in ("results", "overlay_png", "error", "skipped")}
    tmp = out / f"{RECORD_FILE}.tmp"
    tmp.write_text(json.dumps(saved, indent=1))
    tmp.replace(out / RECORD_FILE)


def _reuse_record(out: Path, record: RunRecord) -> bool:
    """Fill ``record`` from the report folder when this run (same name, so the same resolved
    configuration) finished there; an unreadable record means the run is done again."""
    try:
        saved = json.loads((out / RECORD_FILE).read_text())
        if saved.get("run_name") != record.run_name:
            return False
        record.results = json.loads((out / "results.json").read_text())
    except (OSError, ValueError):
        return False
    record.mlflow_run_id = saved.get("mlflow_run_id")  # in the store the run was tracked in
    record.knn_history = [tuple(point) for point in saved.get("knn_history", [])]
    record.wall_s = float(saved.get("wall_s", 0))
    record.train_s = float(saved.get("train_s", 0))
    record.images_per_s = float(saved.get("images_per_s", 0))
    record.device = saved.get("device", "")
    record.model_version = saved.get("model_version", "")
    record.commit = saved.get("commit", "")
    record.code_digest = saved.get("code_digest", "")
    overlay = out / "attention_overlay.png"
    record.overlay_png = overlay.read_bytes() if overlay.is_file() else None
    record.skipped = True
    return True


def make_report(spec: BenchmarkSpec, runs: list[RunRecord], wall_s: float,
                report_root: str | Path = REPORT_ROOT, commit: str = "unknown") -> Report:
    first = next(iter(spec.configs.values()))
    devices = sorted({r.device for r in runs if r.device}) or ["?"]
    # A resumed benchmark's own wall time leaves out the runs it reused: state both.
    machine_s = sum(r.machine_s for r in runs)
    intro = [
        f"{spec.description}. Generated {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC on "
        f"{platform.machine()} with {os.cpu_count()} CPU cores (runs on: {', '.join(devices)}); "
        f"{versions()}; commit {commit}. Machine time: {machine_s:.0f} s of pretraining and "
        f"evaluation for the {len(runs)} runs (over all their sessions), {wall_s:.0f} s in "
        "this invocation.",
        f"Reproduce: {spec.command(report_root)}",
        f"{len(runs)} runs: strategies {', '.join(spec.strategies)} x seeds {spec.seeds}; model "
        f"{first.model.arch} depth {first.model.dims[1]} at {first.model.image_size} px, "
        f"{first.train.epochs} epochs, masking ratio {first.masking.ratio} with probability "
        f"{first.masking.prob}. Accuracies in %, mean ± std over seeds.",
    ]
    trained_by = Counter(f"{r.commit or 'not recorded'} (code {r.code_digest or '?'})"
                         for r in runs if not r.error)
    intro.append("Trained by: " + "; ".join(f"commit {k}: {n} run(s)" for k, n in
                                            trained_by.items()) +
                 (" -- MIXED CODE: the paired differences include the code change (run with "
                  "--allow-mixed-code)." if len({r.code_digest for r in runs if not r.error}) > 1
                  else ".") + f" Report written by attmask {__version__}.")
    if first.train.knn_split == "test":
        intro.append("SELECTED ON TEST: the runs' online k-NN monitor read the test split "
                     "(train.knn_split=test), so anything chosen by it is optimistic on test.")
    if spec.smoke:
        intro.append("SMOKE SCALE: a budget of minutes on a small CPU, to show that every stage "
                     "works end to end, whether the features learn (the gain over init above) "
                     "and how a comparison is read. It does not say which strategy is better: "
                     "at this budget the strategies differ by less than the noise unless the "
                     "paired table says otherwise (--seeds 0-2 adds the interval); "
                     "studies/small-scale/README.md has the CPU recipe study, and the cifar10-cpu or "
                     "paper-20pct-in1k presets compare strategies.")
    if len(runs) < len(spec.configs):
        intro.append(f"IN PROGRESS: {len(runs)} of {len(spec.configs)} runs finished; running "
                     "the same command again continues from the finished runs and the latest "
                     "checkpoints.")
    failed = [r for r in runs if r.error]
    if failed:
        intro.append("FAILED RUNS: " + "; ".join(f"{r.run_name}: {r.error}" for r in failed))
    lead = takeaways(Rows.of(runs, spec.strategies), spec.strategies)
    tables = build_tables(runs, spec.strategies)
    figures = build_figures(runs, spec.strategies)
    if spec.sequential is not None:
        tables.insert(1, sequential_table(runs, spec.strategies, spec.sequential))
        figures.insert(0, sequential_figure(runs, spec.strategies, spec.sequential))
    return Report(f"attmask benchmark: {spec.name}", lead + intro, tables, figures)


def sequential_figure(runs: list[RunRecord], strategies: list[str],
                      plan: SequentialPlan) -> tuple[str, str, bytes]:
    """Each comparison's interval after every seed, against 0 and the +-margin band."""
    from attmask.viz import line_chart_png

    series: dict[str, list[tuple[float, float]]] = {}
    for strategy, history in sequential_decisions(runs, strategies, plan).items():
        looks = [d for d in history if not math.isnan(d.low)]
        series[f"{strategy}: upper"] = [(d.seeds, d.high) for d in looks]
        series[f"{strategy}: mean"] = [(d.seeds, d.mean) for d in looks]
        series[f"{strategy}: lower"] = [(d.seeds, d.low) for d in looks]
    png = line_chart_png(series, f"k-NN top-1 minus {strategies[0]}: interval after each seed",
                         "seeds", "points", {f"+{plan.margin:g}": plan.margin, "0": 0.0,
                                             f"-{plan.margin:g}": -plan.margin})
    return ("sequential.png", "Each comparison's interval as seeds were added", png)


def sequential_table(runs: list[RunRecord], strategies: list[str],
                     plan: SequentialPlan) -> Table:
    """Each comparison's verdict, why it stopped, and its interval after every seed."""
    rows = []
    for strategy, history in sequential_decisions(runs, strategies, plan).items():
        last = history[-1]
        rounds = "; ".join(f"{d.seeds}: [{d.low:+.1f}, {d.high:+.1f}]" for d in history
                           if not math.isnan(d.low))
        rows.append([strategy, str(last.seeds),
                     "—" if math.isnan(last.mean) else f"{last.mean:+.1f}",
                     "—" if math.isnan(last.low) else f"[{last.low:+.1f}, {last.high:+.1f}]",
                     last.verdict, last.reason + (" (running: add seeds)" if last.more else ""),
                     rounds or "—"])
    return Table(f"Decided by adding seeds: k-NN top-1 minus {strategies[0]}, +-{plan.margin:g} "
                 "points", ["strategy", "seeds", "mean difference", "interval",
                            "verdict", "why it stopped", "interval after each seed"], rows,
                 note=f"One more seed was added for each comparison whose interval still "
                      f"contained 0 and was not within +-{plan.margin:g}, up to "
                      f"{plan.max_seeds} seeds. Every interval is a Student t interval over "
                      f"per-seed differences at level {100 * plan.level:.2f} % (alpha "
                      f"{plan.alpha:g} spread over the {plan.looks} looks the plan allows, "
                      "Bonferroni alpha spending: Jennison & Turnbull 2000), so a 'better' or "
                      f"'worse' verdict on a null difference has probability at most "
                      f"{plan.alpha:g} however often the comparison was looked at "
                      "(attmask/eval/sequential.py).")


def versions() -> str:
    from importlib.metadata import version

    return ", ".join(f"{name} {version(name)}" for name in ("torch", "timm", "ray", "mlflow"))



def _log_report(tracker: Tracker, parent: str, report_dir: Path, runs: list[RunRecord]) -> None:
    # Per-strategy means on the parent run, so its charts compare the strategies at a glance.
    tracker.log_metrics(parent, {
        f"{name}/{strategy}": statistics.fmean(values)
        for strategy in dict.fromkeys(r.strategy for r in runs)
        for name, path in (("knn_top1", KNN_TOP1), ("linear_top1", LINEAR_TOP1))
        if (values := metric_values([r for r in runs if r.strategy == strategy
                                     and r.error is None], path))})
    for name in ("report.md", "report.html"):
        tracker.log_artifact(parent, report_dir / name, "report")
    tracker.log_artifact(parent, report_dir / "img", "report/img")
    tracker.finish(parent, "FAILED" if any(r.error for r in runs) else "FINISHED")
