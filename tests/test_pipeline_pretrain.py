"""Ray Train pretraining with real Ray, real MLflow (SQLite and an `mlflow server`), real shards."""
import os
import re
import signal
import subprocess
import sys
import threading
import time

import pytest
import ray.train
import torch
from mlflow.tracking import MlflowClient

from attmask.engine import NonFiniteLossError
from attmask.errors import ConfigError, UserError
from attmask.runtime import load_checkpoint
from conftest import ROOT, free_port, serve_mlflow, stop_process, tiny_config, tiny_yaml
from pipelines.faults import FaultInjection
from pipelines.pretrain import run_pretrain, validate_cluster

pytestmark = pytest.mark.ray


def ray_cfg(data, tmp_path, *extra):
    return tiny_config(f"data.path={data}", f"train.output_dir={tmp_path}",
                       "train.steps_per_epoch=3", "data.local_crops_number=1",
                       "train.log_every_steps=1", "tracking.log_images_every_epochs=1",
                       "train.knn_train_samples=64", "train.knn_test_samples=32", *extra)


def test_two_workers_with_mlflow_readback(ray_local, synthetic_dir, tmp_path):
    cfg = ray_cfg(synthetic_dir, tmp_path, "ray.num_workers=2", "train.run_name=two")
    result = run_pretrain(cfg, log=lambda s: None)
    assert result.steps == 6 and result.metrics["step"] == 6
    client = MlflowClient(tracking_uri=result.tracking_uri)
    knn = client.get_metric_history(result.mlflow_run_id, "knn_top1")
    assert [m.step for m in knn] == [0, 3, 6]  # init, then the end of each epoch
    assert knn[-1].value == result.metrics["knn_top1"]
    from attmask.data.shards import load_dataset

    scored = min(32, load_dataset(synthetic_dir).num_samples("val"))  # knn_test_samples=32, of val
    assert round(knn[-1].value * scored, 6).is_integer()  # whole images
    run = client.get_run(result.mlflow_run_id)
    assert run.info.status == "FINISHED" and run.data.tags["strategy"] == "attmask_high"
    assert run.data.params["masking.strategy"] == "attmask_high"
    assert run.data.params["ray.num_workers"] == "2" and "version.torch" in run.data.tags
    loss = client.get_metric_history(result.mlflow_run_id, "loss")
    assert [m.step for m in loss] == list(range(1, 7))
    for key in ("cls_loss", "patch_loss", "lr", "weight_decay", "teacher_momentum",
                "teacher_temp", "masked_fraction", "images_per_s", "knn_top1"):
        assert client.get_metric_history(result.mlflow_run_id, key), key
    artifacts = {a.path for d in ("config", "model", "checkpoint", "attention")
                 for a in client.list_artifacts(result.mlflow_run_id, d)}
    assert {"config/config.yaml", "model/teacher_backbone.safetensors",
            "checkpoint/state.pt", "attention/epoch_0001.png"} <= artifacts
    # the teacher backbone is a registered model version, tagged with what produced it
    assert run.data.tags["model_version"] == result.model_version == "attmask-teacher/1"
    registry = MlflowClient(tracking_uri=result.tracking_uri, registry_uri=result.tracking_uri)
    version = registry.get_model_version("attmask-teacher", "1")
    assert version.run_id == result.mlflow_run_id and version.source.endswith("/model")
    assert version.tags["strategy"] == "attmask_high" and version.tags["run_name"] == "two"
    assert len(version.tags["config_sha256"]) == 16
    state = load_checkpoint(os.path.join(result.checkpoint_path, "state.pt"))
    assert state["step"] == 6


def test_killed_worker_resumes_exactly_and_completes(ray_local, synthetic_dir, tmp_path):
    """Rank 1 dies at step 5; the group restarts from the step-4 checkpoint (mid-epoch) and ends
    with the losses and weights of a run that was never interrupted."""
    common = ("ray.num_workers=2", "ray.max_failures=1", "train.epochs=3",
              "train.checkpoint_every_steps=2", "tracking.log_images_every_epochs=0",
              "model.drop_path=0.1")
    straight = run_pretrain(ray_cfg(synthetic_dir, tmp_path, *common, "train.run_name=straight"),
                            log=lambda s: None)
    cfg = ray_cfg(synthetic_dir, tmp_path, *common, "train.run_name=crash")
    result = run_pretrain(cfg, fault=FaultInjection(5, "exit", rank=1), log=lambda s: None)
    assert result.steps == 9
    assert (tmp_path / "ray" / "crash.fault").read_text().startswith("fault injected at step 5")
    client = MlflowClient(tracking_uri=result.tracking_uri)
    history = client.get_metric_history(result.mlflow_run_id, "loss")
    steps = [m.step for m in history]
    assert sorted(set(steps)) == list(range(1, 10))  # one continuous history in one run
    assert steps == sorted(steps)  # replayed steps come after the checkpoint they resume from
    expected = {m.step: m.value for m in client.get_metric_history(straight.mlflow_run_id, "loss")}
    assert {m.step: m.value for m in history} == expected
    # the resume is on record in the run itself, at the checkpoint's step
    assert [(m.step, m.value) for m in client.get_metric_history(result.mlflow_run_id,
                                                                 "resumed_from_step")] == [(4, 4.0)]
    assert not client.get_metric_history(straight.mlflow_run_id, "resumed_from_step")
    a, b = (load_checkpoint(os.path.join(r.checkpoint_path, "state.pt"))["teacher"]
            for r in (straight, result))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_rerun_with_same_name_resumes_the_same_mlflow_run(ray_local, synthetic_dir, tmp_path):
    cfg = ray_cfg(synthetic_dir, tmp_path, "train.epochs=3", "train.run_name=again",
                  "tracking.log_images_every_epochs=0")
    fault = FaultInjection(4)
    with pytest.raises(ray.train.TrainingFailedError):
        run_pretrain(cfg, fault=fault, log=lambda s: None)  # max_failures=0: stops at step 4
    result = run_pretrain(cfg, fault=fault, log=lambda s: None)  # same command again
    assert result.steps == 9
    client = MlflowClient(tracking_uri=result.tracking_uri)
    runs = client.search_runs([client.get_experiment_by_name("attmask").experiment_id],
                              "tags.`attmask.run_name` = 'again'")
    assert len(runs) == 1 and runs[0].info.run_id == result.mlflow_run_id
    steps = [m.step for m in client.get_metric_history(result.mlflow_run_id, "loss")]
    assert steps[0] == 1 and steps[-1] == 9 and sorted(set(steps)) == list(range(1, 10))


def test_unreadable_latest_checkpoint_is_named_and_an_older_one_resumed(ray_local, synthetic_dir,
                                                                         tmp_path):
    cfg = ray_cfg(synthetic_dir, tmp_path, "train.epochs=3", "train.run_name=torn",
                  "train.checkpoint_every_steps=2", "train.checkpoint_keep=5",
                  "tracking.log_images_every_epochs=0")
    fault = FaultInjection(5)
    with pytest.raises(ray.train.TrainingFailedError):
        run_pretrain(cfg, fault=fault, log=lambda s: None)  # stops at step 5 (max_failures=0)
    checkpoints = sorted(p for p in (tmp_path / "ray" / "torn").glob("checkpoint_*") if p.is_dir())
    latest = checkpoints[-1] / "state.pt"
    assert load_checkpoint(latest)["step"] == 4
    latest.write_bytes(latest.read_bytes()[:2000])  # torn, e.g. a disk that filled up
    messages = []
    result = run_pretrain(cfg, fault=fault, log=messages.append)  # same command again
    assert result.steps == 9
    client = MlflowClient(tracking_uri=result.tracking_uri)
    assert client.get_run(result.mlflow_run_id).info.status == "FINISHED"


def test_nan_loss_stops_the_run_with_the_step(ray_local, synthetic_dir, tmp_path):
    cfg = ray_cfg(synthetic_dir, tmp_path, "ray.num_workers=2",
                  "tracking.log_images_every_epochs=0", "train.run_name=nan")
    with pytest.raises(NonFiniteLossError, match="loss is nan at step 4"):
        run_pretrain(cfg, fault=FaultInjection(4, "nan"), log=lambda s: None)
    checkpoints = sorted(p for p in (tmp_path / "ray" / "nan").glob("checkpoint_*") if p.is_dir())
    assert checkpoints  # the epoch-1 checkpoint (step 3) stays intact
    assert load_checkpoint(checkpoints[-1] / "state.pt")["step"] == 3


def test_unreachable_tracking_server_fails_fast(synthetic_dir, tmp_path):
    cfg = ray_cfg(synthetic_dir, tmp_path, f"tracking.uri=http://127.0.0.1:{free_port()}",
                  "tracking.timeout_s=1")
    start = time.perf_counter()
    with pytest.raises(UserError, match="MLflow server unreachable"):
        run_pretrain(cfg, log=lambda s: None)
    assert time.perf_counter() - start < 10


def test_multi_node_sqlite_is_rejected_by_validation():
    cfg = tiny_config()
    validate_cluster(cfg, "sqlite:////x/mlflow.db", "/x", num_nodes=1)
    with pytest.raises(ConfigError, match="SQLite does not work on a 3-node cluster"):
        validate_cluster(cfg, "sqlite:////x/mlflow.db", "/x", num_nodes=3)
    validate_cluster(cfg, "http://head:5000", "s3://bucket/runs", num_nodes=3)


@pytest.fixture
def mlflow_server(tmp_path):
    url, proc = serve_mlflow(tmp_path)
    yield url, proc
    stop_process(proc)


@pytest.fixture
def mlflow_auth_server(tmp_path):
    """MLflow's basic-auth app, its admin password from the environment as in cluster.yaml."""
    ini = tmp_path / "basic_auth.ini"
    ini.write_text(f"[mlflow]\ndefault_permission = READ\ndatabase_uri = sqlite:///{tmp_path}/"
                   "auth.db\nadmin_username = admin\nauthorization_function = "
                   "mlflow.server.auth:authenticate_request_basic_auth\n")
    password = "test-" + os.urandom(8).hex()
    url, proc = serve_mlflow(tmp_path, "--app-name", "basic-auth", env={
        "MLFLOW_AUTH_CONFIG_PATH": str(ini), "MLFLOW_AUTH_ADMIN_PASSWORD": password,
        "MLFLOW_FLASK_SERVER_SECRET_KEY": os.urandom(16).hex()})
    yield url, password
    stop_process(proc)


def test_basic_auth_server_takes_a_run_with_credentials_and_refuses_one_without(
        synthetic_dir, tmp_path, mlflow_auth_server):
    url, password = mlflow_auth_server
    config = tiny_yaml(tmp_path / "tiny.yaml", "train.steps_per_epoch=2", "train.epochs=1",
                       "data.local_crops_number=1", "tracking.log_images_every_epochs=0",
                       "train.knn_every_epochs=0")
    argv = [sys.executable, "run_pipeline.py", "pretrain", "--config", str(config),
            f"data.path={synthetic_dir}", f"train.output_dir={tmp_path / 'runs'}",
            f"tracking.uri={url}", "train.run_name=authed"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_TRACKING_")}
    for creds, words in (({}, "set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD"),
                         ({"MLFLOW_TRACKING_USERNAME": "admin",
                           "MLFLOW_TRACKING_PASSWORD": "wrong-password"}, "refused")):
        refused = subprocess.run(argv, env=env | creds, capture_output=True, text=True,
                                 timeout=120, cwd=ROOT)
        lines = refused.stderr.strip().splitlines()
        assert refused.returncode == 2 and len(lines) == 1, refused.stderr[-2000:]
        assert lines[0].startswith("error: tracking.uri=") and words in lines[0]
        assert not (tmp_path / "runs").exists()  # refused before any work
    creds = {"MLFLOW_TRACKING_USERNAME": "admin", "MLFLOW_TRACKING_PASSWORD": password}
    done = subprocess.run(argv, env=env | creds, capture_output=True, text=True, timeout=300,
                          cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    # The console carries no error-level line from Ray's core ("[... E pid tid] file.cc:N:")
    ray_errors = re.findall(r"^.*\d E \d+ \d+\] \w+\.cc:\d+.*$", done.stdout + done.stderr,
                            re.M)
    assert not ray_errors, ray_errors
    os.environ.update(creds)  # the test's own client reads them as MLflow's client does
    try:
        client = MlflowClient(tracking_uri=url)
        run = client.search_runs([client.get_experiment_by_name("attmask").experiment_id],
                                 "tags.`attmask.run_name` = 'authed'")[0]
        assert run.info.status == "FINISHED"
        assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == [1, 2]
    finally:
        for key in creds:
            os.environ.pop(key)


def test_mlflow_server_and_losing_it_mid_run(ray_local, synthetic_dir, tmp_path, mlflow_server):
    url, proc = mlflow_server
    cfg = ray_cfg(synthetic_dir, tmp_path, f"tracking.uri={url}", "train.epochs=4",
                  "tracking.timeout_s=1", "train.run_name=server",
                  "tracking.log_images_every_epochs=0")
    client = MlflowClient(tracking_uri=url)

    def kill_when_logging_started():
        for _ in range(600):
            exp = client.get_experiment_by_name("attmask")
            if exp:
                runs = client.search_runs([exp.experiment_id])
                if runs and client.get_metric_history(runs[0].info.run_id, "loss"):
                    os.killpg(proc.pid, signal.SIGKILL)
                    return
            time.sleep(0.2)

    killer = threading.Thread(target=kill_when_logging_started, daemon=True)
    killer.start()
    result = run_pretrain(cfg, log=lambda s: None)
    killer.join(5)
    assert result.steps == 12  # training finished although the server went away
    assert result.model_version == ""  # nothing to register with: the store is gone
    assert proc.poll() is not None and result.logging["errors"] > 0


@pytest.mark.parametrize("extra, asked", [
    (("ray.use_gpu=true",), "1 x (1 CPU, 1 GPU)"),
    (("ray.cpus_per_worker=1000",), "1 x (1000 CPU)"),
    (("ray.num_workers=4096",), "4096 x (1 CPU)"),
])
def test_a_request_the_cluster_cannot_meet_fails_at_once_not_forever(ray_local, synthetic_dir,
                                                                     tmp_path, extra, asked):
    """A GPU run on a machine without a GPU waited forever with its MLflow run RUNNING."""
    cfg = ray_cfg(synthetic_dir, tmp_path, "ray.cpus_per_worker=1", *extra)
    start = time.perf_counter()
    with pytest.raises(UserError, match=re.escape(asked) + r".*the cluster can place"):
        run_pretrain(cfg, log=lambda s: None)
    assert time.perf_counter() - start < 30
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/ray/mlflow.db")
    experiments = client.search_experiments()
    runs = client.search_runs([e.experiment_id for e in experiments]) if experiments else []
    assert not [r for r in runs if r.info.status == "RUNNING"]


def test_the_private_ray_name_the_worker_quiets_still_exists():
    """pipelines/pretrain.py: train_worker lowers Ray Train's per-report logger through a
    private module (no public API in Ray 2.60); a Ray upgrade that moves it fails here."""
    import logging

    from ray.train.v2._internal.execution import context as train_context

    assert isinstance(train_context.logger, logging.Logger)
