"""Shared fixtures: a tiny model config and small generated shard directories."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from attmask.config import Config, load_config  # noqa: E402
from attmask.data.prepare import PrepareArgs, prepare_data  # noqa: E402

TINY = [
    "model.arch=vit_tiny", "model.depth=2", "model.image_size=32", "model.local_image_size=16",
    "model.patch_size=4", "model.out_dim=256", "model.head_hidden_dim=128",
    "model.head_bottleneck_dim=64", "train.batch_size_per_worker=8", "train.epochs=2",
    "train.precision=fp32", "data.local_crops_number=2", "data.num_workers=0",
    "data.shuffle_buffer=16", "optim.warmup_epochs=0", "loss.warmup_teacher_temp_epochs=1",
    "train.log_every_steps=1",
]


def tiny_config(*overrides: str) -> Config:
    """A 2-block ViT-Tiny-width model on 32 px images, fast enough for unit tests."""
    return load_config(overrides=TINY + list(overrides))


def tiny_yaml(path: Path, *overrides: str) -> Path:
    """The tiny config (plus ``overrides``) as a YAML file, for --config and search/bench bases."""
    import yaml

    data: dict = {}
    for item in TINY + list(overrides):
        key, value = item.split("=", 1)
        section, name = key.split(".")
        data.setdefault(section, {})[name] = yaml.safe_load(value)
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture(scope="session")
def synthetic_dir(tmp_path_factory) -> Path:
    """160 train / 32-per-variant synthetic images at 32 px, in 8 shards per split."""
    out = tmp_path_factory.mktemp("synthetic")
    prepare_data(PrepareArgs(source="synthetic", out=str(out), num_samples=160,
                             num_test_samples=32, seed=1))
    return out


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray instance for the whole session (each start costs seconds); only stopped
    here, by this process, never with ``ray stop``."""
    import os

    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    import ray

    ray.init(address="local", num_cpus=4, include_dashboard=True, dashboard_host="127.0.0.1")
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A full training checkpoint (state.pt) of the tiny model after one step."""
    import torch

    from attmask.engine import Engine

    engine = Engine(tiny_config(), steps_per_epoch=2)
    engine.train_step(torch.randn(2, 8, 3, 32, 32), torch.randn(2, 8, 3, 16, 16))
    return engine.save(tmp_path_factory.mktemp("ckpt") / "state.pt")


# ---------------------------------------------------------------------------------- servers
# Real services started by the tests on 127.0.0.1, each ended by the PID (group) it started.


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_mlflow(tmp_path: Path, *extra: str, env: dict | None = None):
    """An ``mlflow server`` on 127.0.0.1 (its own process group); returns (url, process)."""
    import os
    import subprocess
    import time
    import urllib.request

    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri",
         f"sqlite:///{tmp_path}/server.db", "--artifacts-destination", str(tmp_path / "art"),
         "--host", "127.0.0.1", "--port", str(port), "--workers", "1", *extra],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        env=dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false", **(env or {})))
    url = f"http://127.0.0.1:{port}"
    for _ in range(120):
        try:
            urllib.request.urlopen(f"{url}/health", timeout=1)
            return url, proc
        except OSError:
            time.sleep(0.5)
    stop_process(proc)
    pytest.fail("mlflow server did not start")


def stop_process(proc) -> None:
    import os
    import signal

    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)


def serve_folder(folder: Path):
    """A folder over HTTP on 127.0.0.1 from a thread of this process; returns (url, server)."""
    import functools
    import http.server
    import threading

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(Quiet, directory=str(folder)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return f"http://127.0.0.1:{server.server_address[1]}", server
