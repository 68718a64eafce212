"""Scale-out on one machine: a head and worker "nodes" (real raylets, tests/cluster_sim.py),
tracking through an `mlflow server`, storage on a directory that plays the shared filesystem,
shards read over HTTP, and a whole node lost mid-run. Run alone with `pytest -m multinode`."""
import json
import os
import signal
import subprocess
import sys

import pytest
import yaml
from mlflow.tracking import MlflowClient

from conftest import ROOT, serve_folder, serve_mlflow, stop_process, tiny_yaml

pytestmark = pytest.mark.multinode


def simulate(scenario: str, spec: dict, timeout: int = 400, capture: bool = False):
    """Run a scenario of tests/cluster_sim.py; on a timeout its process group gets SIGTERM,
    on which it stops every process of its cluster."""
    proc = subprocess.Popen([sys.executable, str(ROOT / "tests" / "cluster_sim.py"), scenario,
                             json.dumps(spec)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd=ROOT, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    lines = [x for x in out.splitlines() if x.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, (out[-3000:], err[-5000:])
    result = json.loads(lines[-1].removeprefix("RESULT "))
    return (result, out + err) if capture else result


@pytest.fixture
def services(tmp_path, synthetic_dir):
    url, server = serve_folder(synthetic_dir)
    tracking, proc = serve_mlflow(tmp_path)
    yield url, tracking
    server.shutdown()
    stop_process(proc)


def test_node_loss_resumes_on_a_replacement_node_with_one_history(tmp_path, services):
    shards, tracking = services
    config = tiny_yaml(tmp_path / "tiny.yaml", "train.steps_per_epoch=3", "train.epochs=6",
                       "data.local_crops_number=1", "tracking.log_images_every_epochs=0",
                       "train.knn_every_epochs=0", "train.checkpoint_every_steps=2")
    result = simulate("pretrain_node_loss", {"config": str(config), "overrides": [
        f"data.path={shards}", f"tracking.uri={tracking}", f"ray.storage_path={tmp_path / 'shared'}",
        f"train.output_dir={tmp_path / 'runs'}", "ray.num_workers=2", "ray.max_failures=1",
        "train.run_name=nodeloss"]})
    print(f"recovery after losing a node: {result['recovery_s']:.1f}s (loss -> next checkpoint)")
    assert result["steps"] == 18
    # Two worker groups of two: the first on node_a and node_b (one worker per node, none on
    # the head, which has no CPU), the restarted one on node_a and the replacement node_c.
    assert sorted(result["workers"]) == ["node_a", "node_a", "node_b", "node_c"]
    assert result["rank0_node"] in ("node_a", "node_c")
    assert result["recovery_s"] is not None and result["recovery_s"] < 120
    history = MlflowClient(tracking_uri=tracking).get_metric_history(result["mlflow_run_id"],
                                                                      "loss")
    assert sorted({m.step for m in history}) == list(range(1, 19))  # none missing
    values: dict[int, set] = {}
    for m in history:
        values.setdefault(m.step, set()).add(m.value)
    assert all(len(v) == 1 for v in values.values())  # a replayed step repeats its value exactly
    resumes = MlflowClient(tracking_uri=tracking).get_metric_history(result["mlflow_run_id"],
                                                                     "resumed_from_step")
    assert len(resumes) == 1 and 2 <= resumes[0].step < 18  # from a checkpoint, not from scratch


def test_tune_spreads_trials_over_nodes_and_a_lost_nodes_trial_resumes(tmp_path, services):
    shards, tracking = services
    base = tiny_yaml(tmp_path / "tiny.yaml", "train.steps_per_epoch=3", "train.epochs=4",
                     "data.local_crops_number=1", "tracking.log_images_every_epochs=0",
                     "train.knn_every_epochs=0", "train.checkpoint_every_steps=2",
                     "ray.max_failures=1")
    search = tmp_path / "search.yaml"
    search.write_text(yaml.safe_dump({
        "base": str(base), "space": {"masking.strategy": {"grid": [
            "random", "attmask_high", "attmask_hint", "block"]}},
        "metric": "loss", "mode": "min", "num_samples": 1, "search": "grid",
        "resources_per_trial": {"workers": 1, "cpus_per_worker": 0.99}, "max_concurrent": 2}))
    out = simulate("tune_across_nodes", {"search": str(search), "overrides": [
        f"data.path={shards}", f"tracking.uri={tracking}", f"ray.storage_path={tmp_path / 'shared'}",
        f"train.output_dir={tmp_path / 'runs'}"]}, capture=True)
    result, stdout = out
    assert [r["status"] for r in result["rows"]] == ["completed"] * 4
    assert result["killed"] and "node_b" in result["workers"] and "node_a" in result["workers"]
    assert "head" not in result["workers"]  # the head has no CPU for a Train worker
    # The lost node's trial went on from its checkpoint: its MLflow run records the resume
    # (a worker's printed line can be lost with its node's log forwarding).
    client = MlflowClient(tracking_uri=tracking)
    resumed = [r for e in client.search_experiments()
               for r in client.search_runs([e.experiment_id], "metrics.resumed_from_step > 0")]
    assert len(resumed) >= 1, stdout[-3000:]
