"""The evaluation suite as Ray tasks, logged to MLflow, written to ``OUT/results.json``.

One task extracts and caches the features every part needs; then each part (k-NN, linear probe,
few-shot, robustness, attention-on-object) runs as its own task, on a GPU where the cluster has
one. Results and plots go to the pretraining run's MLflow run when ``--mlflow-run`` names it,
else to a new run.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Optional

from attmask.config import Config
from attmask.errors import UserError
from attmask.eval.suite import EvalOptions, Evaluator
from pipelines import tracking
from pipelines.pretrain import storage_path
from pipelines.ray_session import ray_session


def fetch_checkpoint(run_id: str, uri: str, out_dir: Path) -> Path:
    """The full checkpoint a pretraining run logged (``checkpoint/state.pt``)."""
    import mlflow

    tracking.configure_client(5.0)
    try:
        local = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="checkpoint",
                                                    tracking_uri=uri, dst_path=str(out_dir))
    except Exception as exc:  # noqa: BLE001 - unknown run, missing artifact, dead server
        raise UserError(f"--mlflow-run {run_id}: cannot fetch its checkpoint from {uri} "
                        f"({exc.__class__.__name__}: {str(exc)[:160]})") from exc
    return Path(local) / "state.pt"


def _run_part(args: dict, part: str) -> dict:
    """Body of one Ray task: the evaluator on this worker, then one part of the suite."""
    from attmask.viz import attention_and_masks, confusion_png, mask_grid_png

    ev = Evaluator(args["checkpoint"], args["data"], cache_dir=args["cache_dir"],
                   options=EvalOptions(**args["options"]), robustness_set=args["robustness_set"])
    start = time.perf_counter()
    pictures = {}
    if part == "prefetch":
        ev.prefetch()
        result: dict = {}
    elif part == "linear":
        result, cm = ev.linear()
        pictures["confusion_matrix.png"] = confusion_png(cm, ev.dataset.classes,
                                                         "linear probe, test split")
    elif part == "attention":
        result = ev.attention()
        batch = ev.viz_batch()
        attn, masks = attention_and_masks(ev.backbone, batch["image"], ev.cfg.model.patch_size,
                                          ("random", "block", "attmask_high", "attmask_low",
                                           "attmask_hint"), ev.cfg.masking.layer,
                                          ev.cfg.masking.head_reduce)
        pictures["attention_overlay.png"] = mask_grid_png(batch["image"], attn, masks,
                                                          "teacher attention and masks")
    else:
        result = getattr(ev, part)()
    return {"part": part, "result": result, "pictures": pictures,
            "seconds": time.perf_counter() - start}


def flat_metrics(results: dict) -> dict[str, float]:
    """``results.json`` -> MLflow metric names (``eval/knn_k20_top1``, ...)."""
    out = {}
    for k, acc in results.get("knn", {}).items():
        out[f"eval/knn_{k}_top1"], out[f"eval/knn_{k}_top5"] = acc["top1"], acc["top5"]
    if "top1" in results.get("linear", {}):
        out["eval/linear_top1"] = results["linear"]["top1"]
        out["eval/linear_val_top1"] = results["linear"]["val_top1"]
    for nu, r in results.get("fewshot", {}).items():
        if "mean" in r:
            out[f"eval/fewshot_{nu}_mean"], out[f"eval/fewshot_{nu}_std"] = r["mean"], r["std"]
    robustness = results.get("robustness", {})
    for name, acc in robustness.get("variants", {}).items():
        out[f"eval/robustness_{name}"] = acc
    if "bg_gap" in robustness:
        out["eval/bg_gap"] = robustness["bg_gap"]
    for name, value in results.get("attention", {}).items():
        if isinstance(value, float):
            out[f"eval/attention_{name}"] = value
    return out


def run_evaluate(cfg: Config, *, data: str, checkpoint: Optional[str] = None,
                 mlflow_run: Optional[str] = None, suite: Optional[list[str]] = None,
                 robustness_set: Optional[str] = None, out_dir: str = "eval",
                 options: Optional[EvalOptions] = None, address: Optional[str] = None,
                 log: Callable[[str], None] = print) -> dict:
    """Evaluate one checkpoint; returns the ``results.json`` content."""
    import ray

    from attmask.viz import bar_chart_png

    if (checkpoint is None) == (mlflow_run is None):
        raise UserError("give exactly one of --checkpoint PATH and --mlflow-run RUN_ID")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    uri = tracking.resolve_tracking_uri(cfg, storage_path(cfg))
    if mlflow_run is not None:
        tracking.check_tracking(uri, cfg.tracking.timeout_s)
        checkpoint = str(fetch_checkpoint(mlflow_run, uri, out))
    options = options or EvalOptions()
    if suite:
        options.suite = suite
    # Validate checkpoint, data and options here, before any task is scheduled.
    probe = Evaluator(checkpoint, data, cache_dir=out / "features", options=options,
                      robustness_set=robustness_set, device=None)
    del probe
    args = {"checkpoint": str(Path(checkpoint).resolve()), "data": str(data),
            "cache_dir": str((out / "features").resolve()), "options": asdict(options),
            "robustness_set": str(Path(robustness_set).resolve()) if robustness_set else None}
    start = time.perf_counter()
    with ray_session(address):
        gpus = 1 if ray.cluster_resources().get("GPU", 0) >= 1 else 0
        task = ray.remote(num_cpus=1, num_gpus=gpus)(_run_part)
        ray.get(task.remote(args, "prefetch"))  # every part below reads these cached features
        parts = ray.get([task.remote(args, part) for part in options.suite])
    results: dict = {"checkpoint": str(checkpoint), "data": str(data)}
    pictures: dict[str, bytes] = {}
    for p in parts:
        results[p["part"]] = p["result"]
        pictures.update(p["pictures"])
        log(f"{p['part']}: {json.dumps(p['result'])[:300]} ({p['seconds']:.1f}s)")
    if "variants" in results.get("robustness", {}):
        pictures["robustness.png"] = bar_chart_png({"linear probe": results["robustness"]["variants"]},
                                                   "background robustness (test variants)")
    results["wall_s"] = time.perf_counter() - start
    (out / "results.json").write_text(json.dumps(results, indent=1))
    for name, png in pictures.items():
        (out / name).write_bytes(png)
    results["mlflow_run_id"] = _log_to_mlflow(cfg, uri, mlflow_run, checkpoint, out, results,
                                              list(pictures))
    (out / "results.json").write_text(json.dumps(results, indent=1))
    return results


def _log_to_mlflow(cfg: Config, uri: str, run_id: Optional[str], checkpoint: str, out: Path,
                   results: dict, pictures: list[str]) -> str:
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    tracking.check_tracking(uri, cfg.tracking.timeout_s)
    client = MlflowClient(tracking_uri=uri)
    created = run_id is None
    if created:
        run_id = tracking.get_or_create_run(uri, cfg, f"eval-{Path(checkpoint).parent.name}",
                                            storage_path(cfg), extra_tags={"kind": "evaluation"})
    now = int(time.time() * 1000)
    metrics = [Metric(k, float(v), now, 0) for k, v in flat_metrics(results).items()]
    for i in range(0, len(metrics), 200):
        client.log_batch(run_id, metrics=metrics[i:i + 200])
    client.log_artifact(run_id, str(out / "results.json"), "eval")
    for name in pictures:
        client.log_artifact(run_id, str(out / name), "eval")
    if created:
        client.set_terminated(run_id, "FINISHED")
    return run_id
