"""cluster.yaml validated offline with Ray's own checks; job submission to a real local head."""
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, free_port


def validate(cfg: dict) -> None:
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(cfg))


def shipped() -> dict:
    return yaml.safe_load((ROOT / "cluster.yaml").read_text())


def test_cluster_yaml_is_valid_for_the_launcher():
    cfg = shipped()
    validate(cfg)
    types = cfg["available_node_types"]
    assert "GPU" not in types[cfg["head_node_type"]]["resources"]
    assert {t["resources"].get("GPU") for t in types.values()} >= {1, 8}
    assert cfg["provider"]["type"] == "aws" and "mlflow server" in " ".join(cfg["head_start_ray_commands"])
    text = (ROOT / "cluster.yaml").read_text().lower()
    assert "aws_secret" not in text and "access_key" not in text  # no credentials


@pytest.mark.parametrize("mutate, error", [
    (lambda c: c.update(head_node_type="nope"), ValueError),
    (lambda c: c["available_node_types"]["gpu_1x"]["resources"].update(CPU=0.5), Exception),
    (lambda c: c.update(setup_comands=[]), Exception),
    (lambda c: c["available_node_types"]["gpu_1x"].pop("node_config"), Exception),
])
def test_broken_cluster_yaml_is_rejected(mutate, error):
    cfg = shipped()
    mutate(cfg)
    with pytest.raises(error):
        validate(cfg)


def test_kuberay_manifest_shape_and_credentials_from_a_secret():
    docs = {d["kind"]: d for d in yaml.safe_load_all((ROOT / "deploy" / "rayjob.yaml").read_text())}
    job = docs["RayJob"]
    assert "run_pipeline.py benchmark" in job["spec"]["entrypoint"]
    cluster = job["spec"]["rayClusterSpec"]
    assert cluster["rayVersion"] == "2.60.0" and cluster["headGroupSpec"]["serviceType"] == "ClusterIP"
    assert docs["Service"]["spec"]["type"] == "ClusterIP"
    mlflow = docs["Deployment"]["spec"]["template"]["spec"]["containers"][0]
    assert "--app-name basic-auth" in " ".join(mlflow["args"])
    pods = [cluster["headGroupSpec"]["template"], *(g["template"] for g in cluster["workerGroupSpecs"]),
            job["spec"]["submitterPodTemplate"], docs["Deployment"]["spec"]["template"]]
    envs = [e for pod in pods for c in pod["spec"]["containers"] for e in c["env"]]
    secret_names = {"RAY_AUTH_TOKEN", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_AUTH_ADMIN_PASSWORD",
                    "MLFLOW_FLASK_SERVER_SECRET_KEY"}
    secrets = [e for e in envs if e["name"] in secret_names]
    assert len(secrets) >= 6 and all("secretKeyRef" in e["valueFrom"] and "value" not in e
                                     for e in secrets)
    assert {"name": "RAY_AUTH_MODE", "value": "token"} in envs


def test_the_shipped_cluster_passes_the_security_check():
    from pipelines.cluster_check import security_problems

    assert security_problems(shipped()) == []


def _start_command(cfg: dict, program: str) -> int:
    return next(i for i, c in enumerate(cfg["head_start_ray_commands"]) if program in c)


@pytest.mark.parametrize("mutate, words", [
    (lambda c, i: c["head_start_ray_commands"].__setitem__(
        i, "nohup mlflow server --host 0.0.0.0 --port 5000 > log 2>&1 &"),
     ["without `--app-name basic-auth`", "(and 1 more)"]),
    (lambda c, i: c["head_start_ray_commands"].__setitem__(i, c["head_start_ray_commands"][i]
     .replace('--host "$(hostname -I | awk \'{print $1}\')"', "--host=0.0.0.0")),
     ["--host 0.0.0.0", "every interface"]),
    (lambda c, i: c["head_start_ray_commands"].append("ray start --head --dashboard-host 0.0.0.0"),
     ["dashboard-host=0.0.0.0"]),
    (lambda c, i: c["worker_start_ray_commands"].append("RAY_AUTH_MODE=disabled ray start"),
     ["RAY_AUTH_MODE=disabled"]),
    (lambda c, i: c["head_start_ray_commands"].append(
        "export MLFLOW_AUTH_ADMIN_PASSWORD='hunter2-hunter2'; mlflow server --app-name basic-auth"),
     ["MLFLOW_AUTH_ADMIN_PASSWORD is written into the file"]),
    (lambda c, i: c["available_node_types"]["gpu_1x"].update(
        worker_start_ray_commands=["export RAY_AUTH_TOKEN=abc123; ray start --address=x:6379"]),
     ["available_node_types.gpu_1x.worker_start_ray_commands", "RAY_AUTH_TOKEN"]),
    (lambda c, i: c["head_start_ray_commands"].__setitem__(
        i, "bash -c 'nohup mlflow server --app-name basic-auth --host 0.0.0.0 --port 5000 &'"),
     ["head_start_ray_commands", "--host 0.0.0.0", "every interface"]),
    (lambda c, i: c["head_start_ray_commands"].append("sh -lc \"mlflow ui --host 0.0.0.0\""),
     ["head_start_ray_commands", "`mlflow ui --host 0.0.0.0`", "without authentication"]),
    (lambda c, i: c["setup_commands"].append(
        "echo 'export MLFLOW_TRACKING_URI=http://admin:s3cr3t@10.0.0.5:5000' >> ~/.bashrc"),
     ["setup_commands[", "password (user:PASSWORD@host)"]),
    (lambda c, i: c["provider"].update(aws_secret_access_key="wJalrXUtnFEMI/K7MDENG"),
     ["provider.aws_secret_access_key", "credential is written into the file"]),
    (lambda c, i: c.setdefault("head_node_type", c["head_node_type"]) and
     c["available_node_types"][c["head_node_type"]].setdefault("node_config", {}).update(
         UserData={"api_token": "tok-123456"}),
     ["node_config.UserData.api_token"]),
], ids=["mlflow-open-no-auth", "mlflow-open", "dashboard-open", "auth-off", "password",
        "token-in-node-type", "shell-wrapper", "mlflow-ui", "uri-password", "provider-secret",
        "nested-token"])
def test_an_open_service_or_written_credential_is_one_error_line(tmp_path, capsys, mutate, words):
    from run_pipeline import main

    cfg = shipped()
    mutate(cfg, _start_command(cfg, "mlflow server"))
    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["check-cluster", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {path}: ")
    assert all(w in err[0] for w in words), err[0]
    assert main(["check-cluster", str(ROOT / "cluster.yaml")]) == 0


def head_pids(marks: list[str]) -> set[int]:
    """Processes whose command line names this head (its temp dir or GCS address), and all
    their descendants (agents rename themselves, e.g. ``ray::DashboardAgent``)."""
    parents, found = {}, set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        parents[int(entry.name)] = ppid
        if any(m.encode() in cmdline for m in marks):
            found.add(int(entry.name))
    grew = True
    while grew:
        children = {pid for pid, ppid in parents.items() if ppid in found} - found
        grew = bool(children)
        found |= children
    return found


def stop_head(marks: list[str]) -> None:
    """Stop only the processes of the head this test started (never `ray stop`, which would
    stop every Ray instance of this user)."""
    pids = head_pids(marks)
    for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except OSError:
                pass
        deadline = time.time() + wait
        while time.time() < deadline and any(Path(f"/proc/{p}").exists() for p in pids):
            time.sleep(0.2)


CLIENT = """
import json, sys, time
from ray.job_submission import JobStatus, JobSubmissionClient
address, entrypoint, working_dir = sys.argv[1:4]
client = JobSubmissionClient(address)
job = client.submit_job(entrypoint=entrypoint, runtime_env={
    "working_dir": working_dir, "excludes": ["/data/", "/runs/", "/reports/", ".git/", "*.db"]})
deadline = time.time() + 240
while (status := client.get_job_status(job)) not in {
        JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED} and time.time() < deadline:
    time.sleep(1)
print(json.dumps({"status": str(status), "logs": client.get_job_logs(job)}))
"""


@pytest.mark.ray
def test_job_submission_to_a_local_head(tmp_path):
    import json

    temp_dir = tempfile.mkdtemp(prefix="rj", dir="/tmp")  # short: Ray's socket paths
    dash, gcs = free_port(), free_port()
    marks = [temp_dir, f"127.0.0.1:{gcs}"]
    env = dict(os.environ, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0")
    try:
        started = subprocess.run(
            ["ray", "start", "--head", "--node-ip-address=127.0.0.1", f"--port={gcs}",
             "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", "--num-cpus=2",
             f"--temp-dir={temp_dir}", f"--ray-client-server-port={free_port()}",
             f"--dashboard-agent-listen-port={free_port()}",
             f"--metrics-export-port={free_port()}", "--disable-usage-stats"],
            capture_output=True, text=True, timeout=120, env=env)
        assert started.returncode == 0, started.stderr[-2000:]
        out = tmp_path / "jobdata"
        entrypoint = (f"{sys.executable} run_pipeline.py prepare-data --source synthetic "
                      f"--out {out} --num-samples 16 --num-test-samples 4 --val-fraction 0")
        # Ray 2.60 heads require the auth token: a client sends it with RAY_AUTH_MODE=token
        client = subprocess.run([sys.executable, "-c", CLIENT, f"http://127.0.0.1:{dash}",
                                 entrypoint, str(ROOT)], capture_output=True, text=True,
                                timeout=300, env=dict(os.environ, RAY_AUTH_MODE="token"))
        assert client.returncode == 0, client.stderr[-2000:]
        result = json.loads(client.stdout.strip().splitlines()[-1])
        assert result["status"] == "SUCCEEDED", result["logs"][-2000:]
        assert f"wrote {out}: 10 classes, 32 px; train 16 in 8 shards" in result["logs"]
        assert (out / "dataset.json").is_file()
    finally:
        stop_head(marks)
    assert not any(Path(f"/proc/{p}").exists() for p in head_pids(marks))


def test_no_code_is_left_out_of_what_the_cluster_and_a_job_upload():
    """``data/`` unanchored would match ``attmask/data/`` too: a cluster (rsync_exclude) or a
    job (excludes) without the data package fails on its first import."""
    from ray._private.thirdparty.pathspec.pathspec import PathSpec

    tracked = subprocess.run(["git", "ls-files", "attmask", "pipelines", "configs",
                              "run_pipeline.py"], cwd=ROOT, capture_output=True, text=True,
                             check=True).stdout.split()
    assert any(f.startswith("attmask/data/") for f in tracked)
    patterns = {"cluster.yaml rsync_exclude": yaml.safe_load((ROOT / "cluster.yaml").read_text())
                ["rsync_exclude"], "the job's excludes": re.search(
                    r'"excludes": (\[.*?\])', CLIENT).group(1)}
    for where, lines in patterns.items():
        lines = yaml.safe_load(lines) if isinstance(lines, str) else lines
        spec = PathSpec.from_lines("gitwildmatch", lines)
        assert not [f for f in tracked if spec.match_file(f)], where
        assert spec.match_file("data/train-000000.tar"), where  # and the data stays out


def test_the_container_recipe_pins_what_the_project_pins():
    import tomllib

    pins = dict(d.split("==") for d in tomllib.loads((ROOT / "pyproject.toml").read_text())
                ["project"]["dependencies"] if d.startswith(("torch==", "torchvision==")))
    recipe = (ROOT / "deploy" / "Dockerfile").read_text()
    assert pins and all(f"{name}=={version}" in recipe for name, version in pins.items())
    for path in ("attmask", "pipelines", "configs", "tune_configs", "run_pipeline.py"):
        assert re.search(rf"^COPY .*\b{path}\b", recipe, flags=re.M), path
