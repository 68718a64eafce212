"""Hyperparameter search with Ray Tune: each trial is a distributed pretraining run.

A search is a YAML file (``tune_configs/``)::

    base: tiny-cpu                      # preset name or config path (relative to the repo)
    overrides: {train.epochs: 4}        # dotted key: value, applied to the base
    space:                              # dotted key: one sampler
      masking.ratio: {choice: [[0.1, 0.3], [0.1, 0.5]]}
      masking.prob: {uniform: [0.3, 0.7]}
    metric: knn_top1                    # any reported metric; knn_top1 = the online k-NN
    mode: max
    num_samples: 4                      # repeats of the grid (random/optuna: trials)
    scheduler: {type: asha, time_attr: epoch, grace_period: 1, reduction_factor: 2, max_t: 4}
    search: random                      # random | grid | optuna
    resources_per_trial: {workers: 1, cpus_per_worker: 1, gpus_per_worker: 0}
    max_concurrent: 2

Samplers: ``choice``, ``grid``, ``uniform``, ``loguniform``, ``randint`` (high exclusive),
``quniform``. Everything is validated against the config schema before any trial starts. The
search name (and every trial name) derives from a hash of the resolved YAML, so running the same
command again resumes an interrupted search.
"""
from __future__ import annotations

import csv
import hashlib
import io
import itertools
import json
import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import yaml

from attmask.config import (
    SEARCH_DIR,
    Config,
    config_source,
    from_dict,
    load_config,
    parse_override,
    set_dotted,
)
from attmask.errors import ConfigError, UserError
from attmask.train import KNN_METRICS, LOOP_METRICS, STUDENT_KNN_METRICS

SAMPLERS = {"choice", "grid", "uniform", "loguniform", "randint", "quniform"}
SEARCHES = {"random", "grid", "optuna"}
TOP_KEYS = {"base", "overrides", "space", "metric", "mode", "num_samples", "scheduler", "search",
            "resources_per_trial", "max_concurrent"}
BASE_KEY, PARENT_KEY = "__base__", "__parent_run__"


@dataclass
class TuneSpec:
    name: str
    base: str
    overrides: dict[str, Any]
    space: dict[str, dict[str, Any]]
    metric: str = "knn_top1"
    mode: str = "max"
    num_samples: int = 1
    scheduler: dict[str, Any] = field(default_factory=dict)
    search: str = "random"
    resources_per_trial: dict[str, Any] = field(default_factory=dict)
    max_concurrent: int = 1
    digest: str = ""

    @property
    def search_name(self) -> str:
        return f"tune-{self.name}-{self.digest}"


# ----------------------------------------------------------------------------------------------
# Loading and validation (no Ray needed)


def load_spec(path: str | Path, cli_overrides: Optional[list[str]] = None) -> tuple[TuneSpec, Config]:
    """Read, validate and resolve a search file; returns the spec and the base config."""
    path = Path(path)
    if not path.is_file() and (SEARCH_DIR.parent / path).is_file():
        path = SEARCH_DIR.parent / path  # tune_configs/NAME.yaml of an installed copy
    if not path.is_file():
        raise ConfigError(f"search file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    unknown = sorted(set(raw) - TOP_KEYS)
    if unknown:
        raise ConfigError(f"{path}: unknown key {unknown[0]!r}; allowed: {', '.join(sorted(TOP_KEYS))}")
    for key in ("base", "space"):
        if key not in raw:
            raise ConfigError(f"{path}: missing {key!r}")
    overrides = dict(raw.get("overrides") or {})
    for item in cli_overrides or []:
        key, value = parse_override(item)
        overrides[key] = value
    resolved = {**raw, "overrides": overrides}
    digest = hashlib.sha256(json.dumps(resolved, sort_keys=True, default=str).encode()).hexdigest()[:8]
    spec = TuneSpec(name=path.stem, base=str(raw["base"]), overrides=overrides,
                    space=raw["space"] or {}, metric=raw.get("metric", "knn_top1"),
                    mode=raw.get("mode", "max"), num_samples=raw.get("num_samples", 1),
                    scheduler=raw.get("scheduler") or {}, search=raw.get("search", "random"),
                    resources_per_trial=raw.get("resources_per_trial") or {},
                    max_concurrent=raw.get("max_concurrent", 1), digest=digest)
    base = base_config(spec)
    validate_spec(spec, base)
    return spec, base


def base_config(spec: TuneSpec) -> Config:
    try:
        return load_config(path=config_source(spec.base), overrides=spec.overrides)
    except ConfigError as exc:
        raise ConfigError(f"base/overrides: {exc}") from exc


def apply(base: Config, values: dict[str, Any]) -> Config:
    """A validated copy of ``base`` with dotted ``values`` set."""
    data = base.to_dict()
    for key, value in values.items():
        set_dotted(data, key, value)
    return from_dict(data).validate()


def validate_spec(spec: TuneSpec, base: Config) -> None:
    if spec.metric in ("", None) or not isinstance(spec.metric, str):
        raise ConfigError("metric: a reported metric name, e.g. knn_top1 or loss")
    if spec.mode not in ("min", "max"):
        raise ConfigError(f"mode={spec.mode!r}: allowed values are min, max")
    if not isinstance(spec.num_samples, int) or spec.num_samples < 1:
        raise ConfigError(f"num_samples={spec.num_samples}: must be an integer >= 1")
    if not isinstance(spec.max_concurrent, int) or spec.max_concurrent < 1:
        raise ConfigError(f"max_concurrent={spec.max_concurrent}: must be an integer >= 1")
    if spec.search not in SEARCHES:
        raise ConfigError(f"search={spec.search!r}: allowed values are {', '.join(sorted(SEARCHES))}")
    if not isinstance(spec.space, dict) or not spec.space:
        raise ConfigError("space: a mapping from dotted config keys to samplers")
    for key, sampler in spec.space.items():
        _validate_entry(spec, base, key, sampler)
    sched = dict(spec.scheduler)
    if sched:
        allowed = {"type", "time_attr", "grace_period", "reduction_factor", "max_t"}
        bad = sorted(set(sched) - allowed)
        if bad:
            raise ConfigError(f"scheduler.{bad[0]}: unknown; allowed: {', '.join(sorted(allowed))}")
        if sched.get("type", "asha") != "asha":
            raise ConfigError(f"scheduler.type={sched['type']!r}: allowed values are asha")
        if sched.get("time_attr", "epoch") != "epoch":
            raise ConfigError("scheduler.time_attr: the time unit is the epoch")
        grace, max_t = sched.get("grace_period", 1), sched.get("max_t", base.train.epochs)
        if not (isinstance(grace, int) and isinstance(max_t, int) and 1 <= grace <= max_t):
            raise ConfigError(f"scheduler: need integers 1 <= grace_period ({grace}) <= max_t ({max_t})")
        if max_t > base.train.epochs:
            raise ConfigError(f"scheduler.max_t={max_t}: more than train.epochs={base.train.epochs}")
        if not sched.get("reduction_factor", 2) > 1:
            raise ConfigError("scheduler.reduction_factor: must be > 1")
    res = spec.resources_per_trial
    bad = sorted(set(res) - {"workers", "cpus_per_worker", "gpus_per_worker"})
    if bad:
        raise ConfigError(f"resources_per_trial.{bad[0]}: unknown; allowed: workers, "
                          "cpus_per_worker, gpus_per_worker")
    for name, low, kinds in (("workers", 1, (int,)), ("cpus_per_worker", 1e-9, (int, float)),
                             ("gpus_per_worker", 0, (int, float))):
        value = res.get(name, low)
        if isinstance(value, bool) or not isinstance(value, kinds) or value < low:
            allowed = "an integer >= 1" if name == "workers" else \
                "a number > 0" if low else "a number >= 0"
            raise ConfigError(f"resources_per_trial.{name}={value!r}: must be {allowed}")
    reported = set(LOOP_METRICS)
    if base.train.knn_every_epochs:
        reported |= set(KNN_METRICS) | (set(STUDENT_KNN_METRICS) if base.train.knn_student
                                        else set())
    if spec.metric not in reported:
        raise ConfigError(f"metric={spec.metric!r}: no trial reports it; reported: "
                          f"{', '.join(sorted(reported))}")
    if spec.search == "optuna":
        try:
            import optuna  # noqa: F401
        except ImportError as exc:
            raise ConfigError("search: optuna needs the optuna package "
                              "(pip install -e '.[optuna]')") from exc


def _validate_entry(spec: TuneSpec, base: Config, key: str, sampler: Any) -> None:
    where = f"space[{key!r}]"
    if not isinstance(sampler, dict) or len(sampler) != 1:
        raise ConfigError(f"{where}: expected one sampler, e.g. {{choice: [...]}}; allowed: "
                          f"{', '.join(sorted(SAMPLERS))}")
    (kind, args), = sampler.items()
    if kind not in SAMPLERS:
        raise ConfigError(f"{where}: unknown sampler {kind!r}; allowed: {', '.join(sorted(SAMPLERS))}")
    section, _, rest = key.partition(".")
    name, *deeper = rest.split(".")
    if not name or not hasattr(getattr(base, section, None), name):
        raise ConfigError(f"{where}: {key!r} is not a config key (section.field)")
    field = getattr(getattr(base, section), name)
    if deeper and not isinstance(field, dict):
        raise ConfigError(f"{where}: {section}.{name} is not a mapping; {key!r} cannot go inside")
    if spec.search == "optuna" and kind == "grid":
        raise ConfigError(f"{where}: grid sampling is not available with search: optuna")
    if spec.search == "grid" and kind not in ("grid", "choice"):
        raise ConfigError(f"{where}: search: grid needs grid or choice samplers, not {kind}")
    if kind in ("choice", "grid"):
        if not isinstance(args, list) or not args:
            raise ConfigError(f"{where}: {kind} needs a non-empty list of values")
        values = args
    else:
        n = 3 if kind == "quniform" else 2
        if not isinstance(args, list) or len(args) != n or not all(
                isinstance(a, (int, float)) and not isinstance(a, bool) for a in args):
            raise ConfigError(f"{where}: {kind} needs [low, high{', q' if n == 3 else ''}] numbers")
        lo, hi = args[0], args[1]
        if not lo < hi:
            raise ConfigError(f"{where}: empty range [{lo}, {hi}]")
        if kind == "loguniform" and lo <= 0:
            raise ConfigError(f"{where}: loguniform needs low > 0")
        if kind == "randint" and not (isinstance(lo, int) and isinstance(hi, int)):
            raise ConfigError(f"{where}: randint needs integers (high exclusive)")
        if kind == "quniform" and not args[2] > 0:
            raise ConfigError(f"{where}: quniform needs a step q > 0")
        current = getattr(getattr(base, section), name)
        if kind != "randint" and isinstance(current, int) and not isinstance(current, bool):
            raise ConfigError(f"{where}: {key} is an integer; {kind} draws real numbers (use "
                              "randint or choice)")
        values = [lo, hi - 1 if kind == "randint" else hi]
    for value in values:
        try:
            apply(base, {key: value})
        except ConfigError as exc:
            raise ConfigError(f"{where}: value {value!r} is not allowed ({exc})") from exc


def tune_space(spec: TuneSpec) -> dict[str, Any]:
    from ray import tune

    out = {}
    for key, sampler in spec.space.items():
        (kind, args), = sampler.items()
        if kind == "grid" or (kind == "choice" and spec.search == "grid"):
            out[key] = tune.grid_search(args)
        elif kind == "choice":
            out[key] = tune.choice(args)
        elif kind == "uniform":
            out[key] = tune.uniform(*args)
        elif kind == "loguniform":
            out[key] = tune.loguniform(*args)
        elif kind == "randint":
            out[key] = tune.randint(*args)
        else:
            out[key] = tune.quniform(*args)
    return out


def plan(spec: TuneSpec, base: Config) -> str:
    """The trial plan that ``--dry-run`` prints (no Ray cluster, data or GPU needed)."""
    grids = [len(next(iter(s.values()))) for s in spec.space.values()
             if "grid" in s or (spec.search == "grid" and "choice" in s)]
    trials = spec.num_samples * math.prod(grids)
    sched = spec.scheduler or {}
    split = base.train.knn_split if spec.metric.startswith(("knn", "student_knn")) else None
    lines = [f"search {spec.search_name}: {trials} trial(s), {spec.search} search, metric "
             f"{spec.metric} ({spec.mode})" + (f" on the {split!r} split" if split else "") +
             (" (SELECTED ON TEST)" if split == "test" else "") +
             f", at most {spec.max_concurrent} at a time",
             f"base: {spec.base} with overrides {json.dumps(spec.overrides)}",
             f"scheduler: asha on epochs, grace {sched.get('grace_period', 1)}, reduction "
             f"{sched.get('reduction_factor', 2)}, max_t {sched.get('max_t', base.train.epochs)}"
             if sched else "scheduler: none (every trial runs all epochs)",
             f"each trial: {_resources(spec, base)}", "space:"]
    lines += [f"  {k}: {json.dumps(v)}" for k, v in spec.space.items()]
    rng = random.Random(0)
    lines.append("first trials (a preview; Tune draws its own samples):")
    for i, values in enumerate(_preview(spec, rng, min(trials, 8))):
        lines.append(f"  {i}: {json.dumps(values)}")
    return "\n".join(lines)


def _preview(spec: TuneSpec, rng: random.Random, count: int) -> list[dict]:
    grid_keys = [k for k, s in spec.space.items()
                 if "grid" in s or (spec.search == "grid" and "choice" in s)]
    combos = [dict(zip(grid_keys, c)) for c in itertools.product(
        *(next(iter(spec.space[k].values())) for k in grid_keys))]
    out = []
    while len(out) < count:
        for combo in combos:
            values = dict(combo)
            for key, sampler in spec.space.items():
                if key in values:
                    continue
                (kind, args), = sampler.items()
                if kind == "choice":
                    values[key] = rng.choice(args)
                elif kind == "randint":
                    values[key] = rng.randrange(args[0], args[1])
                elif kind == "loguniform":
                    values[key] = round(math.exp(rng.uniform(math.log(args[0]), math.log(args[1]))), 6)
                elif kind == "quniform":
                    values[key] = round(round(rng.uniform(args[0], args[1]) / args[2]) * args[2], 6)
                else:
                    values[key] = round(rng.uniform(*args), 6)
            out.append(values)
            if len(out) == count:
                break
    return out


def _resources(spec: TuneSpec, base: Config) -> str:
    res = spec.resources_per_trial
    return (f"{res.get('workers', base.ray.num_workers)} worker(s) x "
            f"{res.get('cpus_per_worker', base.ray.cpus_per_worker)} CPU"
            + (f" + {res['gpus_per_worker']} GPU" if res.get("gpus_per_worker") else ""))


# ----------------------------------------------------------------------------------------------
# Running


def trial_config(loop: dict) -> Config:
    """The pretraining config of one trial: base + sampled values + what a trial must do."""
    values = {k: v for k, v in loop.items() if k not in (BASE_KEY, PARENT_KEY, "__resources__")}
    cfg = apply(from_dict(loop[BASE_KEY]), values)
    res = loop["__resources__"]
    cfg.ray.num_workers = res.get("workers", cfg.ray.num_workers)
    cfg.ray.cpus_per_worker = res.get("cpus_per_worker", cfg.ray.cpus_per_worker)
    if res.get("gpus_per_worker"):
        cfg.ray.use_gpu = True
    # ASHA's time unit is the epoch and every report must carry the metric: report (and run the
    # online k-NN) at every epoch end, nowhere else.
    cfg.train.knn_every_epochs, cfg.train.checkpoint_every_steps = 1, 0
    return cfg


def _trial(loop: dict) -> None:
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from pipelines.pretrain import run_pretrain

    cfg = trial_config(loop)
    cfg.train.run_name = tune.get_context().get_trial_name()
    run_pretrain(cfg, parent_run_id=loop[PARENT_KEY], callbacks=[TuneReportCallback()])


@dataclass
class TuneResult:
    search_name: str
    rows: list[dict]
    best: dict
    best_config_path: Path
    out_dir: Path
    parent_run_id: str


def run_tune(spec: TuneSpec, base: Config, *, address: Optional[str] = None,
             log: Callable[[str], None] = print) -> TuneResult:
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    from attmask.train import open_dataset
    from attmask.viz import param_plot_png
    from pipelines.ray_session import check_fits, ray_session
    from pipelines.tracking import Tracker

    tracker = Tracker.connect(base)
    if "://" not in str(base.data.path or ""):
        dataset = open_dataset(base)
        if spec.metric.startswith("knn") and base.train.knn_split not in dataset.splits:
            raise UserError(f"metric {spec.metric}: the data has no {base.train.knn_split!r} "
                            "split for the online k-NN")
    search = spec.search_name
    tune_dir = Path(tracker.storage) / "tune"
    out_dir = tune_dir / search / "report"
    res = spec.resources_per_trial
    with ray_session(address):
        check_fits(res.get("workers", base.ray.num_workers),
                   res.get("cpus_per_worker", base.ray.cpus_per_worker),
                   res.get("gpus_per_worker", 1 if base.ray.use_gpu else 0),
                   "resources_per_trial (one trial)")
        parent = tracker.open_run(base, search, tags={"kind": "tune", "tune.search": search})
        param_space = {BASE_KEY: base.to_dict(), PARENT_KEY: parent,
                       "__resources__": dict(spec.resources_per_trial), **tune_space(spec)}
        trainable = tune.with_resources(_trial, {"cpu": 0.01})
        path = str(tune_dir / search)
        if tune.Tuner.can_restore(path):
            log(f"resuming search {search} from {path}")
            tuner = tune.Tuner.restore(path, trainable, resume_errored=True,
                                       param_space=param_space)
        else:
            sched = spec.scheduler
            scheduler = (ASHAScheduler(time_attr="epoch",
                                       max_t=sched.get("max_t", base.train.epochs),
                                       grace_period=sched.get("grace_period", 1),
                                       reduction_factor=sched.get("reduction_factor", 2))
                         if sched else None)
            search_alg = None
            if spec.search == "optuna":
                from ray.tune.search.optuna import OptunaSearch
                search_alg = OptunaSearch()
            tuner = tune.Tuner(
                trainable, param_space=param_space,
                tune_config=tune.TuneConfig(
                    metric=spec.metric, mode=spec.mode, num_samples=spec.num_samples,
                    scheduler=scheduler, search_alg=search_alg,
                    max_concurrent_trials=spec.max_concurrent,
                    trial_name_creator=lambda t: f"{search}_{t.trial_id.split('_')[-1]}",
                    trial_dirname_creator=lambda t: t.trial_id.split("_")[-1]),
                # A trial whose driver died with its node is retried; its run resumes from the
                # run's last checkpoint (same run name, same storage).
                run_config=tune.RunConfig(
                    name=search, storage_path=str(tune_dir), verbose=0,
                    failure_config=tune.FailureConfig(max_failures=base.ray.max_failures)))
        grid = tuner.fit()
    rows = results_table(grid, spec)
    best_row = _best(rows, spec)
    best_cfg = apply(base, {k: best_row[k] for k in spec.space})
    best_cfg.train.run_name = None
    out_dir.mkdir(parents=True, exist_ok=True)
    best_path = out_dir / "best_config.yaml"
    best_path.write_text(selection_note(spec, base) + best_cfg.to_yaml())
    (out_dir / "results.csv").write_text(rows_to_csv(rows, spec))
    (out_dir / "metric_vs_params.png").write_bytes(param_plot_png(rows, list(spec.space),
                                                                  spec.metric))
    for name in ("results.csv", "metric_vs_params.png", "best_config.yaml"):
        tracker.log_artifact(parent, out_dir / name, "tune")
    if best_row.get(spec.metric) is not None:
        tracker.log_metrics(parent, {f"best_{spec.metric}": best_row[spec.metric]})
    tracker.finish(parent)
    return TuneResult(search, rows, best_row, best_path, out_dir, parent)


def selection_note(spec: TuneSpec, base: Config) -> str:
    """The comment heading ``best_config.yaml``: which split its metric was measured on."""
    split = base.train.knn_split if spec.metric.startswith(("knn", "student_knn")) else None
    where = f"the online k-NN on the {split!r} split" if split else "the training loss"
    note = f"# Best trial of search {spec.search_name} by {spec.metric} ({spec.mode}), {where}.\n"
    if split == "test":
        note += "# SELECTED ON TEST: a figure reported on the test split for this config is optimistic.\n"
    return note


def results_table(grid, spec: TuneSpec) -> list[dict]:
    max_t = spec.scheduler.get("max_t") if spec.scheduler else None
    rows = []
    for result in grid:
        metrics = result.metrics or {}
        epochs = metrics.get("epoch", 0.0)
        row = {"trial": Path(result.path).name if result.path else "?",
               **{k: result.config.get(k) for k in spec.space},
               spec.metric: metrics.get(spec.metric), "epochs": epochs,
               "status": "error" if result.error else (
                   "stopped early" if max_t and epochs < max_t else "completed")}
        rows.append(row)
    return sorted(rows, key=lambda r: r["trial"])


def _best(rows: list[dict], spec: TuneSpec) -> dict:
    scored = [r for r in rows if r[spec.metric] is not None and r["status"] != "error"]
    if not scored:
        raise UserError(f"no trial reported {spec.metric}; see the trial errors above")
    pick = max if spec.mode == "max" else min
    return pick(scored, key=lambda r: r[spec.metric])


def rows_to_csv(rows: list[dict], spec: TuneSpec) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=["trial", *spec.space, spec.metric, "epochs", "status"])
    writer.writeheader()
    for r in rows:
        writer.writerow({k: json.dumps(v) if isinstance(v, list) else v for k, v in r.items()})
    return buf.getvalue()


def format_table(rows: list[dict], spec: TuneSpec) -> str:
    cols = ["trial", *spec.space, spec.metric, "epochs", "status"]
    cells = [[_fmt(r.get(c)) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    line = lambda vals: "| " + " | ".join(v.ljust(w) for v, w in zip(vals, widths)) + " |"  # noqa: E731
    return "\n".join([line(cols), "|" + "|".join("-" * (w + 2) for w in widths) + "|",
                      *(line(c) for c in cells)])


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return json.dumps(value) if isinstance(value, list) else str(value)
