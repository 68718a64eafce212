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
