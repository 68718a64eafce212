"""The evaluation suite as Ray tasks, logged to MLflow, written to ``OUT/results.json``.

One task extracts and caches the features every part needs; then each part (k-NN, linear probe,
few-shot, robustness, attention-on-object) runs as its own task, on a GPU where the cluster has
one.

Every evaluation has an MLflow run of its own, keyed by what determines its numbers (the
checkpoint's content, the dataset manifest, the options, the robustness set and baselines), so
two evaluations that differ in any of them never share a run. With ``--mlflow-run`` it is a
child of that pretraining run. The pretraining run (its ``eval/*`` metrics, its registered
version's score tags) shows one evaluation, its *canonical* one: the benchmark's, or else the
first made; an ad-hoc evaluation never replaces it.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Optional

import yaml

from attmask import masking
from attmask.config import Config, from_dict
from attmask.errors import UserError, check_output_dir
from attmask.eval.baselines import BASELINES
from attmask.eval.results import FORMAT as RESULTS_FORMAT
from attmask.eval.results import lookup, metric_paths
from attmask.eval.suite import EvalOptions, Evaluator, manifest_id
from attmask.models.export import MLFLOW_URI, resolve_reference
from pipelines import tracking
from pipelines.ray_session import ray_session


def fetch_checkpoint(tracker: tracking.Tracker, run_id: str, out_dir: Path) -> Path:
    """The full checkpoint a pretraining run logged (``checkpoint/state.pt``)."""
    try:
        local = tracker.fetch(run_id, "checkpoint/state.pt", out_dir)
    except Exception as exc:  # noqa: BLE001 - unknown run, dead server
        raise UserError(f"--mlflow-run {run_id}: cannot fetch its checkpoint from {tracker.uri} "
                        f"({exc.__class__.__name__}: {str(exc)[:160]})") from exc
    if local is None:
        raise UserError(f"--mlflow-run {run_id}: the run logged no checkpoint/state.pt "
                        "(it has not finished; evaluate its Ray checkpoint with --checkpoint)")
    return local


def _run_part(args: dict, part: str) -> dict:
    """Body of one Ray task: the evaluator on this worker, then one part of the suite."""
    import ray
    import torch

    from attmask.viz import attention_and_masks, confusion_png, mask_grid_png

    # Ray starts task workers with one intra-op thread; use the CPUs this task was given.
    cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1)
    torch.set_num_threads(max(1, int(cpus)))

    ev = _evaluator(args)
    start = time.perf_counter()
    pictures = {}
    if part == "prefetch":
        ev.prefetch()
        result: dict = {}
    elif part == "linear":
        result, cm = ev.linear()
        pictures["confusion_matrix.png"] = confusion_png(cm, ev.dataset.classes,
                                                         "linear probe, test split")
    elif part == "attention" and ev.backbone is None:
        result = ev.attention()  # says why it is skipped
    elif part == "attention":
        result = ev.attention()
        batch = ev.viz_batch()
        attn, masks = attention_and_masks(ev.backbone, batch["image"], ev.cfg.model.patch_size,
                                          masking.available(), ev.cfg.masking.layer,
                                          ev.cfg.masking.head_reduce)
        pictures["attention_overlay.png"] = mask_grid_png(batch["image"], attn, masks,
                                                          "teacher attention and masks")
    else:
        result = getattr(ev, part)()
    return {"part": part, "result": result, "pictures": pictures,
            "seconds": time.perf_counter() - start}


def _evaluator(args: dict) -> Evaluator:
    """The evaluator a task's ``args`` describe: a checkpoint, or a baseline of a config."""
    import ray

    common = dict(cache_dir=args["cache_dir"], options=EvalOptions(**args["options"]),
                  robustness_set=args["robustness_set"])
    if args.get("baseline"):
        cfg = from_dict(yaml.safe_load(args["config"])).validate()
        return Evaluator.for_baseline(args["baseline"], cfg, args["data"], **common)
    # The checkpoint was read once, by the driver; every task gets the model from the object
    # store instead of loading the file again.
    model, cfg_yaml, model_id = ray.get(args["model"])
    return Evaluator(model, from_dict(yaml.safe_load(cfg_yaml)).validate(), model_id,
                     args["data"], **common)


def _evaluate_parts(args: dict, suite: list[str], task, log: Callable[[str], None],
                    label: str) -> tuple[dict, dict[str, bytes]]:
    """Features once (cached), then every part of ``suite`` as its own task."""
    import ray

    # Feature extraction (most of the work) runs alone, on every CPU of one node; the parts
    # that read the cached features then run side by side, one CPU each.
    node_cpus = max(int(n["Resources"].get("CPU", 1)) for n in ray.nodes() if n["Alive"])
    whole_node = min(node_cpus, os.cpu_count() or 1)
    ray.get(task.options(num_cpus=whole_node).remote(args, "prefetch"))
    parts = ray.get([task.remote(args, part) for part in suite])
    results: dict = {}
    pictures: dict[str, bytes] = {}
    for p in parts:
        results[p["part"]] = p["result"]
        pictures.update(p["pictures"])
        log(f"{label}{p['part']}: {headline(p['part'], p['result'])} ({p['seconds']:.1f}s)")
    return results, pictures


def headline(part: str, result: dict) -> str:
    """A part's main figures in % for the console, e.g. ``k20_top1 70.9, k200_top1 64.2``
    (top-5 and spreads stay in ``results.json``)."""
    wrapped = {part: result}
    shown = [f"{name.removeprefix(part + '_')} {100 * lookup(wrapped, path):.1f}"
             for name, path in metric_paths(wrapped).items()
             if not name.endswith(("_top5", "_std"))]
    return (", ".join(shown) + " (%)") if shown else "no figures (see results.json)"


def _baseline(kind: str, model_cfg: Config, args: dict, suite: list[str], task, cache: Path,
              log: Callable[[str], None]) -> dict:
    """One baseline's results, computed once per (baseline, data, options) and then read back
    from ``cache`` by every later evaluation that needs it."""
    probe = Evaluator.for_baseline(kind, model_cfg, args["data"], cache_dir=args["cache_dir"],
                                   options=EvalOptions(**args["options"]),
                                   robustness_set=args["robustness_set"])
    key = json.dumps([probe.model_id, manifest_id(probe.dataset), args["options"], suite,
                      args["robustness_set"], RESULTS_FORMAT], sort_keys=True)
    path = cache / f"{kind}-{hashlib.sha256(key.encode()).hexdigest()[:16]}.json"
    if path.is_file():
        log(f"baseline {kind}: reusing {path}")
        return json.loads(path.read_text())
    part_args = dict(args, baseline=kind, config=model_cfg.to_yaml())
    parts = [p for p in suite if not (kind == "pixels" and p in ("attention", "finetune"))]
    results, _ = _evaluate_parts(part_args, parts, task, log, f"baseline {kind}: ")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(results, indent=1))
    tmp.replace(path)
    return results


def flat_metrics(results: dict) -> dict[str, float]:
    """``results.json`` -> MLflow metric names (``eval/knn_k20_top1``; a baseline's
    ``eval/init/knn_k20_top1``), named by :func:`attmask.eval.results.metric_paths`."""
    out = {f"eval/{name}": lookup(results, path) for name, path in metric_paths(results).items()}
    for kind, baseline in results.get("baselines", {}).items():
        out.update({f"eval/{kind}/{name}": lookup(baseline, path)
                    for name, path in metric_paths(baseline).items()})
    return out


def run_evaluate(cfg: Config, *, data: str, checkpoint: Optional[str] = None,
                 mlflow_run: Optional[str] = None,
                 robustness_set: Optional[str] = None, out_dir: str = "eval",
                 options: Optional[EvalOptions] = None, address: Optional[str] = None,
                 log: Callable[[str], None] = print,
                 baselines: tuple[str, ...] = BASELINES,
                 architecture: Optional[Config] = None, canonical: bool = False) -> dict:
    """Evaluate one checkpoint; returns the ``results.json`` content. ``architecture`` is the
    model config of a ``.safetensors`` backbone (a full checkpoint carries its own).
    ``canonical``: this evaluation becomes the one the pretraining run shows (the benchmark's);
    otherwise only where that run has none yet."""
    import ray
    import torch

    from attmask.viz import bar_chart_png

    if (checkpoint is None) == (mlflow_run is None):
        raise UserError("give exactly one of --checkpoint PATH and --mlflow-run RUN_ID")
    out = check_output_dir(out_dir, "--out")
    options = (options or EvalOptions()).validate()
    for kind in baselines:
        if kind not in BASELINES:
            raise UserError(f"--baselines {kind}: allowed values are {', '.join(BASELINES)}")
    tracker = tracking.Tracker.connect(cfg)  # before the work, not after it
    if mlflow_run is not None:
        out.mkdir(parents=True, exist_ok=True)
        checkpoint = str(fetch_checkpoint(tracker, mlflow_run, out))
    elif MLFLOW_URI.fullmatch(checkpoint):  # models:/NAME/VERSION, runs:/ID/PATH
        out.mkdir(parents=True, exist_ok=True)
        checkpoint = str(resolve_reference(checkpoint, tracker.uri, out / "backbone"))
    # Validate checkpoint and data here, before any task is scheduled.
    checked = Evaluator.from_checkpoint(checkpoint, data, config=architecture,
                                        cache_dir=out / "features", options=options,
                                        robustness_set=robustness_set, device=torch.device("cpu"))
    model_cfg = checked.cfg  # the checkpoint's own config: its architecture and seed
    for split in checked.dataset.splits:  # as training does: a changed shard is named now
        checked.dataset.check_shards(split, verify=cfg.data.verify_checksums)
    args = {"data": str(data), "cache_dir": str((out / "features").resolve()),
            "options": asdict(options),
            "robustness_set": str(Path(robustness_set).resolve()) if robustness_set else None}
    options_key = options_digest(options, baselines, checked.dataset, robustness_set)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with ray_session(address):
        args["model"] = ray.put((checked.model, model_cfg.to_yaml(), checked.model_id))
        del checked
        gpus = 1 if ray.cluster_resources().get("GPU", 0) >= 1 else 0
        task = ray.remote(num_cpus=1, num_gpus=gpus)(_run_part)
        parts, pictures = _evaluate_parts(args, options.suite, task, log, "")
        results: dict = {"checkpoint": str(checkpoint), "data": str(data), **parts}
        cache = Path(cfg.train.output_dir).resolve() / "baselines"
        results["baselines"] = {kind: _baseline(kind, model_cfg, args, options.suite, task, cache,
                                                log) for kind in baselines}
    if "variants" in results.get("robustness", {}):
        pictures["robustness.png"] = bar_chart_png({"linear probe": results["robustness"]["variants"]},
                                                   "background robustness (test variants)")
    results["wall_s"] = time.perf_counter() - start
    (out / "results.json").write_text(json.dumps(results, indent=1))
    for name, png in pictures.items():
        (out / name).write_bytes(png)
    results["mlflow_run_id"] = _log_to_mlflow(cfg, mlflow_run, checkpoint, out, results,
                                              list(pictures), options_key, canonical)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    return results


MODEL_TAGS = ("eval/knn_k20_top1", "eval/linear_top1", "eval/finetune_top1", "eval/bg_gap")


EVALUATES_TAG = "attmask.evaluates"  # on an evaluation run: the pretraining run it evaluates
OPTIONS_TAG = "attmask.evaluation_options"  # on an evaluation run: its options_digest
CANONICAL_TAG = "attmask.evaluation_run"  # on a pretraining run: its canonical evaluation


def options_digest(options: EvalOptions, baselines: tuple[str, ...], dataset,
                   robustness_set: Optional[str]) -> str:
    """What, besides the checkpoint, determines an evaluation's numbers: the options, the
    baselines, the dataset (its manifest: shards and their checksums) and the robustness set
    (its files' content)."""
    from attmask.data.shards import sha256_file

    robustness = ({p.name: sha256_file(p) for p in sorted(Path(robustness_set).glob("*.npz"))}
                  if robustness_set else None)
    key = json.dumps([asdict(options), sorted(baselines), manifest_id(dataset), robustness,
                      RESULTS_FORMAT], sort_keys=True, default=str)
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def evaluation_run_name(checkpoint: str | Path, options_key: str = "") -> str:
    """An evaluation's MLflow run is keyed by what it evaluates and how: the checkpoint's
    content and :func:`options_digest`, so two models, or one model on two datasets or with two
    sets of options, never share a run (whatever their folders are called), and re-evaluating
    the same file the same way updates its run."""
    path = Path(checkpoint)
    path = path / "state.pt" if path.is_dir() else path
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    digest.update(options_key.encode())
    stem = re.sub(r"[^A-Za-z0-9._-]", "_", path.stem)[:60]  # a file name may hold anything
    return f"eval-{stem}-{digest.hexdigest()[:12]}"


def _log_to_mlflow(cfg: Config, pretraining_run: Optional[str], checkpoint: str, out: Path,
                   results: dict, pictures: list[str], options_key: str,
                   canonical: bool) -> str:
    tracker = tracking.Tracker.connect(cfg)  # again: the server may have gone during the work
    tags = {"kind": "evaluation", OPTIONS_TAG: options_key}
    if pretraining_run is not None:
        tags |= {EVALUATES_TAG: pretraining_run, "mlflow.parentRunId": pretraining_run}
    run_id = tracker.open_run(cfg, evaluation_run_name(checkpoint, options_key), tags=tags)
    metrics = flat_metrics(results)
    tracker.log_metrics(run_id, metrics)
    for name in ["results.json", *pictures]:
        tracker.log_artifact(run_id, out / name, "eval")
    tracker.finish(run_id)
    if pretraining_run is not None and (
            canonical or CANONICAL_TAG not in tracker.run_tags(pretraining_run)):
        # The pretraining run and its registered backbone show one evaluation's scores.
        tracker.set_tags(pretraining_run, {CANONICAL_TAG: run_id})
        tracker.log_metrics(pretraining_run, metrics)
        if (version := tracker.model_version(pretraining_run)) is not None:
            tracker.tag_model_version(version, {
                **{key.removeprefix("eval/"): f"{value:.4f}" for key, value in metrics.items()
                   if key in MODEL_TAGS}, "evaluation_run": run_id})
    return run_id
