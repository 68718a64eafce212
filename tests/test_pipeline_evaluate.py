"""The evaluation suite as Ray tasks, from an MLflow run, with results in MLflow and on disk."""
import json

import pytest
import torch
from mlflow.tracking import MlflowClient

import attmask
from attmask.errors import UserError
from attmask.eval.results import decode_hits
from attmask.eval.suite import EvalOptions
from attmask.models.export import load_teacher
from conftest import tiny_config
from pipelines.evaluate import (
    CANONICAL_TAG,
    EVALUATES_TAG,
    flat_metrics,
    headline,
    options_digest,
    run_evaluate,
)
from pipelines.pretrain import run_pretrain

pytestmark = pytest.mark.ray


def test_evaluate_mlflow_run_end_to_end(ray_local, synthetic_dir, tmp_path):
    cfg = tiny_config(f"data.path={synthetic_dir}", f"train.output_dir={tmp_path}",
                      "train.steps_per_epoch=2", "train.epochs=1", "data.local_crops_number=1",
                      "tracking.log_images_every_epochs=0", "train.knn_every_epochs=0")
    trained = run_pretrain(cfg, log=lambda s: None)
    out = tmp_path / "eval"
    logged = []
    results = run_evaluate(cfg, data=str(synthetic_dir), mlflow_run=trained.mlflow_run_id,
                           out_dir=str(out), options=EvalOptions(probe_epochs=5, shots=(1,)),
                           log=logged.append)
    on_disk = json.loads((out / "results.json").read_text())
    client = MlflowClient(tracking_uri=trained.tracking_uri)
    evaluation = client.get_run(on_disk["mlflow_run_id"])  # a run of its own, under the run
    assert evaluation.data.tags["mlflow.parentRunId"] == trained.mlflow_run_id
    assert evaluation.data.tags[EVALUATES_TAG] == trained.mlflow_run_id
    assert set(on_disk) >= {"checkpoint", "data", "knn", "linear", "fewshot", "robustness",
                            "attention"}
    n_test = 32  # the synthetic test split
    assert set(on_disk["knn"]["k20"]) == {"top1", "top5", "n", "hits", "images"}
    assert on_disk["knn"]["k20"]["n"] == n_test  # the count the report judges noise by
    # which test images k-NN got right, on the same images as the init network's: the report
    # compares the two image by image
    hits, images = decode_hits(on_disk["knn"]["k20"])
    init_hits, init_images = decode_hits(on_disk["baselines"]["init"]["knn"]["k20"])
    assert len(hits) == n_test and hits.mean() == pytest.approx(on_disk["knn"]["k20"]["top1"])
    assert images == init_images and len(init_hits) == n_test
    assert not any(on_disk["knn"]["k20"]["hits"] in line for line in logged)  # not in the log
    assert set(on_disk["linear"]) >= {"top1", "val_top1", "epoch"}
    assert on_disk["fewshot"]["1"]["splits"] == 5
    assert "bg_gap" in on_disk["robustness"] and "mixed_rand" in on_disk["robustness"]["variants"]
    assert set(on_disk["attention"]) >= {"topk_on_object", "masked_on_object"}
    for key in ("eval/knn_k20_top1", "eval/knn_k20_top5", "eval/linear_top1"):
        correct = flat_metrics(results)[key] * n_test  # an accuracy counts whole images
        assert correct == pytest.approx(round(correct), abs=1e-6), key
    run_names = {k for k in flat_metrics(results)}
    assert "eval/init/knn_k20_top1" in run_names and "eval/pixels/knn_k20_top1" in run_names
    run = client.get_run(trained.mlflow_run_id)
    assert run.data.tags[CANONICAL_TAG] == evaluation.info.run_id  # the first: canonical
    assert run.data.metrics["eval/knn_k20_top1"] == on_disk["knn"]["k20"]["top1"]
    version = MlflowClient(tracking_uri=trained.tracking_uri, registry_uri=trained.tracking_uri
                           ).get_model_version(*trained.model_version.split("/"))
    assert float(version.tags["knn_k20_top1"]) == pytest.approx(on_disk["knn"]["k20"]["top1"],
                                                                abs=1e-4)
    assert "eval/bg_gap" in run.data.metrics and "eval/fewshot_1_mean" in run.data.metrics
    # both reference points, with the same protocols, in results.json and in MLflow
    base = on_disk["baselines"]
    assert set(base) == {"init", "pixels"}
    assert set(base["init"]) == {"knn", "linear", "fewshot", "robustness", "attention"}
    assert "attention" not in base["pixels"] and "bg_gap" in base["pixels"]["robustness"]
    assert run.data.metrics["eval/init/knn_k20_top1"] == base["init"]["knn"]["k20"]["top1"]
    assert run.data.metrics["eval/pixels/linear_top1"] == base["pixels"]["linear"]["top1"]
    assert not any("reusing" in line for line in logged)
    # a second evaluation of the same seed and data reuses them instead of recomputing
    again = run_evaluate(cfg, data=str(synthetic_dir), mlflow_run=trained.mlflow_run_id,
                         out_dir=str(tmp_path / "eval2"),
                         options=EvalOptions(probe_epochs=5, shots=(1,)), log=logged.append)
    assert again["baselines"] == base
    assert sum("reusing" in line for line in logged) == 2
    assert again["mlflow_run_id"] == evaluation.info.run_id  # the same evaluation: its run
    artifacts = {a.path for a in client.list_artifacts(evaluation.info.run_id, "eval")}
    assert {"eval/results.json", "eval/confusion_matrix.png", "eval/attention_overlay.png",
            "eval/robustness.png"} <= artifacts
    # An ad-hoc evaluation (fewer test images, k-NN only) is a run of its own and replaces
    # neither the pretraining run's scores nor its registered version's tags.
    shown = dict(client.get_run(trained.mlflow_run_id).data.metrics)
    registry = MlflowClient(tracking_uri=trained.tracking_uri, registry_uri=trained.tracking_uri)
    tags = dict(registry.get_model_version(*trained.model_version.split("/")).tags)
    adhoc = run_evaluate(cfg, data=str(synthetic_dir), mlflow_run=trained.mlflow_run_id,
                         out_dir=str(tmp_path / "adhoc"), baselines=(),
                         options=EvalOptions(suite=["knn"], max_test_samples=8), log=print)
    assert adhoc["mlflow_run_id"] not in (evaluation.info.run_id, trained.mlflow_run_id)
    assert adhoc["knn"]["k20"]["n"] == 8
    assert client.get_run(trained.mlflow_run_id).data.metrics == shown
    assert client.get_run(trained.mlflow_run_id).data.tags[CANONICAL_TAG] == \
        evaluation.info.run_id
    assert dict(registry.get_model_version(*trained.model_version.split("/")).tags) == tags
    assert tags["evaluation_run"] == evaluation.info.run_id
    # The registered version is a backbone in one line, and `evaluate` takes its URI: the same
    # k-NN as the ad-hoc evaluation of the run's full checkpoint.
    uri = f"models:/{trained.model_version}"
    backbone = attmask.load_backbone(uri, tracking_uri=trained.tracking_uri)
    teacher, _ = load_teacher(on_disk["checkpoint"])
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(backbone(images), teacher.cls_features(images))
    by_uri = run_evaluate(cfg, data=str(synthetic_dir), checkpoint=uri, baselines=(),
                          out_dir=str(tmp_path / "by_uri"),
                          options=EvalOptions(suite=["knn"], max_test_samples=8), log=print)
    assert by_uri["knn"] == adhoc["knn"]


def test_evaluate_needs_exactly_one_checkpoint_source(synthetic_dir, tmp_path):
    cfg = tiny_config(f"train.output_dir={tmp_path}")
    with pytest.raises(UserError, match="exactly one"):
        run_evaluate(cfg, data=str(synthetic_dir), out_dir=str(tmp_path))
    with pytest.raises(UserError, match="--mlflow-run nope: cannot fetch"):
        run_evaluate(cfg, data=str(synthetic_dir), mlflow_run="nope", out_dir=str(tmp_path))


def test_unreachable_tracking_server_fails_before_any_evaluation(synthetic_dir, tiny_checkpoint,
                                                                  tmp_path):
    import socket
    import time

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = tiny_config(f"train.output_dir={tmp_path}", f"tracking.uri=http://127.0.0.1:{port}",
                      "tracking.timeout_s=1")
    start = time.perf_counter()
    with pytest.raises(UserError, match=f"127.0.0.1:{port}"):
        run_evaluate(cfg, data=str(synthetic_dir), checkpoint=str(tiny_checkpoint),
                     out_dir=str(tmp_path / "eval"))
    assert time.perf_counter() - start < 20
    assert not (tmp_path / "eval").exists() and not (tmp_path / "baselines").exists()


def test_evaluation_runs_are_keyed_by_checkpoint_content(tmp_path):
    from pipelines.evaluate import evaluation_run_name

    a, b = tmp_path / "a" / "checkpoints", tmp_path / "b" / "checkpoints"
    for folder, content in ((a, b"model one"), (b, b"model two")):
        folder.mkdir(parents=True)
        (folder / "step_00000010.pt").write_bytes(content)
    # same folder and file names, different models: different runs
    assert evaluation_run_name(a / "step_00000010.pt") != evaluation_run_name(b / "step_00000010.pt")
    (b / "step_00000010.pt").write_bytes(b"model one")
    assert evaluation_run_name(a / "step_00000010.pt") == evaluation_run_name(b / "step_00000010.pt")


def test_cli_evaluates_a_safetensors_backbone_with_its_config(ray_local, synthetic_dir, tmp_path,
                                                              capsys):
    from attmask.train import pretrain_local
    from conftest import tiny_yaml
    from run_pipeline import main

    args = (f"data.path={synthetic_dir}", f"train.output_dir={tmp_path}",
            "train.steps_per_epoch=2", "train.epochs=1", "train.knn_every_epochs=0")
    run = pretrain_local(tiny_config(*args), log=lambda s: None).run_dir
    config = tiny_yaml(tmp_path / "arch.yaml", *args)
    out = tmp_path / "eval"
    code = main(["evaluate", "--config", str(config), "--checkpoint",
                 str(run / "teacher_backbone.safetensors"), "--data", str(synthetic_dir),
                 "--suite", "knn", "--baselines", "none", "--max-train", "64", "--max-test", "32",
                 "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    results = json.loads((out / "results.json").read_text())
    assert results["checkpoint"].endswith("teacher_backbone.safetensors")
    assert set(results) >= {"knn"} and "linear" not in results and "baselines" in results
    assert round(results["knn"]["k20"]["top1"] * 32, 6).is_integer()  # 32 test images


def test_fine_tuning_runs_as_a_task_with_its_init_baseline(ray_local, synthetic_dir, tmp_path,
                                                           tiny_checkpoint):
    cfg = tiny_config(f"train.output_dir={tmp_path}")
    options = EvalOptions(suite=["finetune"], finetune_epochs=1, finetune_max_train=40,
                          max_test_samples=20)
    results = run_evaluate(cfg, data=str(synthetic_dir), checkpoint=str(tiny_checkpoint),
                           out_dir=str(tmp_path / "ft"), options=options, baselines=("init",),
                           log=lambda s: None)
    assert set(results) >= {"finetune", "baselines"} and "knn" not in results
    assert results["finetune"]["train_images"] == 40
    assert results["baselines"]["init"]["finetune"]["steps"] == results["finetune"]["steps"]
    metrics = flat_metrics(results)
    assert metrics["eval/finetune_top1"] == results["finetune"]["top1"]
    assert metrics["eval/init/finetune_top1"] == results["baselines"]["init"]["finetune"]["top1"]


def test_an_evaluation_is_keyed_by_everything_that_determines_its_numbers(synthetic_dir,
                                                                          tmp_path):
    """Two evaluations that differ in the checkpoint, the data, the options or the robustness
    set land in two runs: one run once showed k-NN on one dataset and robustness on another."""
    import numpy as np

    from attmask.data.prepare import PrepareArgs, prepare_data
    from attmask.data.shards import load_dataset
    from pipelines.evaluate import evaluation_run_name

    data = load_dataset(synthetic_dir)
    other = tmp_path / "other"
    prepare_data(PrepareArgs(source="synthetic", out=str(other), num_samples=40,
                             num_test_samples=8, seed=5))
    rob = tmp_path / "rob"
    rob.mkdir()
    images = np.zeros((4, 32, 32, 3), dtype=np.uint8)
    for name in ("train_original", "test_mixed_rand"):
        np.savez(rob / f"{name}.npz", images=images, labels=np.arange(4) % 2)
    base = options_digest(EvalOptions(), ("init", "pixels"), data, None)
    variants = [options_digest(EvalOptions(max_test_samples=100), ("init", "pixels"), data, None),
                options_digest(EvalOptions(), ("init",), data, None),
                options_digest(EvalOptions(), ("init", "pixels"), load_dataset(other), None),
                options_digest(EvalOptions(), ("init", "pixels"), data, str(rob))]
    assert len({base, *variants}) == 5
    np.savez(rob / "test_mixed_rand.npz", images=images + 1, labels=np.arange(4) % 2)
    assert options_digest(EvalOptions(), ("init", "pixels"), data, str(rob)) != variants[-1]
    assert base == options_digest(EvalOptions(), ("pixels", "init"), data, None)  # stable
    checkpoint = tmp_path / "state.pt"
    checkpoint.write_bytes(b"weights")
    names = {evaluation_run_name(checkpoint, key) for key in (base, *variants)}
    assert len(names) == 5


def test_the_console_shows_each_parts_headline_not_its_json():
    knn = {f"k{k}": {"top1": 0.7, "top5": 0.9, "n": 3000, "hits": "QUJD" * 100,
                     "images": "x" * 400} for k in (10, 20, 100, 200)}
    line = headline("knn", knn)
    assert line == "k10_top1 70.0, k20_top1 70.0, k100_top1 70.0, k200_top1 70.0 (%)"
    assert headline("robustness", {"variants": {"original": 0.5}, "bg_gap": 0.25}) == \
        "original 50.0, bg_gap 25.0 (%)"
