"""The MLflow edge on a real SQLite store: the background logger and safe search filters."""
import subprocess
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from attmask.errors import UserError
from pipelines.tracking import AsyncRunLogger, git_commit, tag_filter


def test_async_logger_flush_makes_everything_queued_visible(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    run_id = client.create_run(client.create_experiment("t")).info.run_id
    logger = AsyncRunLogger(uri, run_id)
    for step in range(1, 51):
        logger.metrics({"loss": 1.0 / step}, step=step)
    assert logger.flush(30.0)  # returns once sent, before close
    history = client.get_metric_history(run_id, "loss")
    assert [m.step for m in history] == list(range(1, 51))
    assert logger.close() == {"errors": 0, "dropped": 0, "last_error": "", "flushed": True}


def test_the_commit_is_marked_changed_by_code_edits_but_not_by_the_report_folder(tmp_path):
    def git(*args):
        return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args],
                              cwd=tmp_path, check=True, capture_output=True, text=True).stdout

    report = tmp_path / "docs" / "results" / "bench"
    report.mkdir(parents=True)
    (tmp_path / "code.py").write_text("a = 1\n")
    (report / "report.md").write_text("two runs\n")
    git("init", "-q")
    git("add", ".")
    git("commit", "-qm", "start")
    head = git("rev-parse", "--short=12", "HEAD").strip()
    assert git_commit(root=tmp_path) == head
    (report / "report.md").write_text("three runs\n")  # the benchmark rewrote its report
    assert git_commit(ignore=report, root=tmp_path) == head
    assert git_commit(root=tmp_path) == head + "+changes"
    (tmp_path / "code.py").write_text("a = 2\n")
    assert git_commit(ignore=report, root=tmp_path) == head + "+changes"
    assert git_commit(ignore=tmp_path.parent / "elsewhere", root=tmp_path) == head + "+changes"
    # from any folder of the checkout, the whole checkout counts
    assert git_commit(ignore=report, root=tmp_path / "docs") == head + "+changes"
    (tmp_path.parent / "not-a-checkout").mkdir(exist_ok=True)
    assert git_commit(root=tmp_path.parent / "not-a-checkout") == "unknown"


def test_search_filters_are_built_from_checked_values_only():
    assert tag_filter({"attmask.run_name": "bench-x-s0"}) == "tags.`attmask.run_name` = 'bench-x-s0'"
    for value in ("x' or '1'='1", "a b", "", "../x"):
        with pytest.raises(UserError, match="not a safe name"):
            tag_filter({"attmask.run_name": value})


def test_tracker_reopens_a_run_by_name_and_round_trips_metrics_and_artifacts(tmp_path):
    from attmask.config import load_config
    from pipelines.tracking import Tracker

    cfg = load_config("tiny-cpu", overrides={"train.output_dir": str(tmp_path)})
    tracker = Tracker.connect(cfg)
    assert tracker.uri == f"sqlite:///{tmp_path / 'ray' / 'mlflow.db'}"
    assert tracker.find_run({"attmask.run_name": "r1"}) is None  # no experiment yet
    run_id = tracker.open_run(cfg, "r1", tags={"kind": "test"})
    tracker.finish(run_id)
    assert tracker.open_run(cfg, "r1") == run_id  # resume: the same run, running again
    assert tracker.client.get_run(run_id).info.status == "RUNNING"
    assert tracker.open_run(cfg, "r2") != run_id

    tracker.log_metrics(run_id, {f"m{i}": i for i in range(450)}, step=3)  # more than a batch
    assert tracker.metric_history(run_id, "m449") == [(3, 449.0)]
    (tmp_path / "dir").mkdir()
    (tmp_path / "dir" / "a.txt").write_text("A")
    tracker.log_artifact(run_id, tmp_path / "dir", "d")
    fetched = tracker.fetch(run_id, "d/a.txt", tmp_path / "out")
    assert fetched is not None and fetched.read_text() == "A"
    assert tracker.fetch(run_id, "d/missing.txt") is None
    found = tracker.find_run({"attmask.run_name": "r1", "kind": "test"})
    assert found is not None and found.info.run_id == run_id
    assert found.data.params["masking.strategy"] == cfg.masking.strategy


def test_each_run_registers_its_backbone_once_and_it_loads_by_name_and_version(tmp_path):
    import mlflow

    from attmask.config import load_config
    from pipelines.tracking import Tracker

    cfg = load_config("tiny-cpu", overrides={"train.output_dir": str(tmp_path)})
    tracker = Tracker.connect(cfg)
    runs = [tracker.open_run(cfg, f"r{i}") for i in range(2)]
    for run_id in runs:
        (tmp_path / "teacher_backbone.safetensors").write_bytes(run_id.encode())
        tracker.log_artifact(run_id, tmp_path / "teacher_backbone.safetensors", "model")
    assert tracker.model_version(runs[0]) is None
    assert [tracker.register_model(r, {"strategy": "random"}) for r in runs] == ["1", "2"]
    assert tracker.register_model(runs[0], {}) == "1"  # a resumed run keeps its version
    tracker.tag_model_version("2", {"knn_k20_top1": "0.3125"})
    version = tracker.client.get_model_version("attmask-teacher", "2")
    assert version.tags == {"strategy": "random", "knn_k20_top1": "0.3125"}
    assert tracker.client.get_run(runs[1]).data.tags["model_version"] == "attmask-teacher/2"
    mlflow.set_registry_uri(tracker.uri)
    try:
        local = mlflow.artifacts.download_artifacts(artifact_uri="models:/attmask-teacher/2",
                                                    dst_path=str(tmp_path / "dl"),
                                                    tracking_uri=tracker.uri)
    finally:
        mlflow.set_registry_uri("")
    assert (Path(local) / "teacher_backbone.safetensors").read_bytes() == runs[1].encode()
    with pytest.raises(UserError, match="32 hex digits"):
        tracker.model_version("x' or '1'='1")


def test_a_run_whose_monitor_reads_test_is_tagged_selected_on_test():
    from attmask.config import load_config
    from pipelines.tracking import code_digest, run_tags

    tags = run_tags(load_config("tiny-cpu"), "r")
    assert tags["monitor.split"] == "val" and "selected_on" not in tags
    assert tags["code_digest"] == code_digest() and len(tags["code_digest"]) == 16
    tags = run_tags(load_config("tiny-cpu", overrides=["train.knn_split=test"]), "r")
    assert tags["selected_on"] == "test"
