"""The MLflow edge on a real SQLite store: the background logger and safe search filters."""
import pytest
from mlflow.tracking import MlflowClient

from attmask.errors import UserError
from pipelines.tracking import AsyncRunLogger, tag_filter


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
