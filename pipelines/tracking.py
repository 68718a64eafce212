"""The MLflow edge: where the store is, a fast reachability check, the ``Tracker`` through
which every pipeline talks to MLflow, and a logger that never blocks the training step."""
from __future__ import annotations

import functools
import hashlib
import logging
import os
import queue
import re
import subprocess
import tempfile
import threading
import time
import urllib.request
from importlib import metadata
from pathlib import Path
from typing import Any, Optional

from attmask import __version__
from attmask.config import SAFE_NAME, Config
from attmask.errors import ConfigError, UserError

log = logging.getLogger(__name__)
RUN_NAME_TAG = "attmask.run_name"
# MLflow 3's UI opens an experiment without a kind on its GenAI trace view ("Traces 0"); this
# kind opens it on runs, metrics and charts.
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")
PACKAGES = ("torch", "torchvision", "timm", "ray", "mlflow", "webdataset")


def resolve_tracking_uri(cfg: Config, storage_path: str) -> str:
    """``tracking.uri`` or, by default, a SQLite database under the (local) storage path."""
    if cfg.tracking.uri:
        return cfg.tracking.uri
    if "://" in storage_path:
        raise ConfigError(f"ray.storage_path={storage_path} is remote: set tracking.uri to an "
                          "mlflow server (e.g. http://HEAD:5000); SQLite needs a local path")
    return f"sqlite:///{Path(storage_path).resolve() / 'mlflow.db'}"


def artifact_location(uri: str, storage_path: str) -> Optional[str]:
    """Artifacts next to a SQLite store (MLflow would use ./mlruns of the CWD); servers proxy."""
    return str(Path(storage_path).resolve() / "mlartifacts") if uri.startswith("sqlite") else None


def configure_client(timeout_s: float) -> None:
    """Short HTTP timeouts and few retries, so a dead server costs seconds, not minutes."""
    os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] = str(int(max(1, timeout_s)))
    os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "1"
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


def sqlite_folder(uri: str) -> Optional[Path]:
    """The folder of a ``sqlite:///PATH`` store, or None for any other store."""
    return Path(uri.removeprefix("sqlite:///")).parent if uri.startswith("sqlite:///") else None


def check_tracking(uri: str, timeout_s: float = 5.0, tries: int = 2) -> None:
    """Fail within seconds, before any training, when the tracking store cannot be reached."""
    if uri.startswith(("http://", "https://")):
        last: Exception | None = None
        for attempt in range(tries):
            try:
                with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout_s) as r:
                    if r.status == 200:
                        check_credentials(uri, timeout_s)
                        return
            except UserError:
                raise
            except Exception as exc:  # noqa: BLE001 - any failure means unreachable
                last = exc
            time.sleep(0.5 * (attempt + 1))
        raise UserError(f"tracking.uri={uri}: MLflow server unreachable ({last}); start it "
                        "(mlflow server --host 127.0.0.1 --port 5000) or fix tracking.uri")
    if folder := sqlite_folder(uri):
        # Checked without writing: a command refused later for bad input leaves no database.
        existing = next(p for p in (folder, *folder.parents) if p.exists())
        if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
            raise UserError(f"tracking.uri={uri}: cannot create the database under {existing} "
                            "(not a writable folder)")
        return
    if uri.startswith(("file:", "./", "/")) or "://" not in uri:
        raise ConfigError(f"tracking.uri={uri}: MLflow 3 refuses the plain file store; use "
                          "sqlite:///PATH/mlflow.db or an http(s) mlflow server")


def check_credentials(uri: str, timeout_s: float) -> None:
    """A server running MLflow's basic-auth app answers 401 without valid credentials; say so
    before any work. Credentials come from the environment, as MLflow's own client reads them."""
    import base64
    import urllib.error

    user = os.environ.get("MLFLOW_TRACKING_USERNAME")
    password = os.environ.get("MLFLOW_TRACKING_PASSWORD")
    request = urllib.request.Request(
        f"{uri.rstrip('/')}/api/2.0/mlflow/experiments/get-by-name?experiment_name=Default")
    if user and password:
        token = base64.b64encode(f"{user}:{password}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    try:
        urllib.request.urlopen(request, timeout=timeout_s).close()
    except urllib.error.HTTPError as exc:
        if exc.code == 401:
            raise UserError(
                f"tracking.uri={uri}: the MLflow server requires credentials and "
                + ("refused those of MLFLOW_TRACKING_USERNAME" if user and password else
                   "none were given; set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD")
            ) from None
        if exc.code == 403:
            raise UserError(f"tracking.uri={uri}: MLflow user {user!r} may not read "
                            "experiments; ask the server's admin for a grant") from None
        # 404 (no such experiment) and the like: the server answered, with our credentials


def git_commit(ignore: Optional[Path] = None, root: Optional[Path] = None) -> str:
    """The commit of the checkout at ``root`` (this code's by default), with ``+changes`` when a
    tracked file differs from it, or ``unknown`` outside a checkout. Changes under ``ignore`` do
    not count: a benchmark rewrites its own report folder, which may be committed
    (docs/results/), as it goes."""
    root = Path(root or Path(__file__).parent.parent).resolve()
    status = ["git", "status", "--porcelain", "--untracked-files=no"]
    if ignore is not None and Path(ignore).resolve().is_relative_to(root):
        status += ["--", ":/", f":(exclude){Path(ignore).resolve()}"]  # the whole checkout
    try:
        head = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=root, text=True,
                              capture_output=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(status, cwd=root, text=True, capture_output=True, timeout=10,
                               check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return head + ("+changes" if dirty.strip() else "")


def code_digest() -> str:
    """A hash of the library code that trains and evaluates a run (every ``attmask/*.py``, by
    path and content): two runs with one digest ran the same code, whatever the commit says
    (a commit with uncommitted changes, or one that only touched docs)."""
    root = Path(__file__).resolve().parent.parent
    h = hashlib.sha256()
    for path in sorted((root / "attmask").rglob("*.py")):
        h.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def run_tags(cfg: Config, run_name: str) -> dict[str, str]:
    tags = {RUN_NAME_TAG: run_name, "strategy": cfg.masking.strategy,
            "framework": cfg.loss.framework, "git_commit": git_commit(),
            "code_digest": code_digest(), "attmask_version": __version__,
            "monitor.split": cfg.train.knn_split}
    if cfg.train.knn_split == "test":  # its online k-NN, and what it steers, read test
        tags["selected_on"] = "test"
    for pkg in PACKAGES:
        try:
            tags[f"version.{pkg}"] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return tags


def tag_filter(tags: dict[str, str]) -> str:
    """An MLflow search filter matching every ``tags`` item exactly. MLflow has no bound
    parameters, so values are checked against the safe name set, never pasted unchecked."""
    for key, value in tags.items():
        if not SAFE_NAME.fullmatch(key.replace(".", "_")) or not SAFE_NAME.fullmatch(value):
            raise UserError(f"tag {key}={value[:80]!r}: not a safe name for an MLflow search")
    return " and ".join(f"tags.`{key}` = '{value}'" for key, value in tags.items())


def storage_path(cfg: Config) -> str:
    """Where runs keep checkpoints (and, by default, the SQLite tracking store)."""
    path = cfg.ray.storage_path or str(Path(cfg.train.output_dir).resolve() / "ray")
    return path if "://" in path else str(Path(path).resolve())


class Tracker:
    """Every MLflow call the pipelines make, against one tracking store and experiment.

    ``Tracker.connect(cfg)`` resolves the store from the config and checks, in seconds, that it
    can be reached; the pipelines then open, log to, search and close runs through it.
    """

    def __init__(self, uri: str, experiment: str = "attmask", storage: Optional[str] = None,
                 timeout_s: float = 5.0):
        configure_client(timeout_s)
        self.uri, self.experiment, self.storage = uri, experiment, storage

    @functools.cached_property
    def client(self):
        """Built on first use, so that connecting (a check before the work) writes nothing: a
        SQLite store and its folder appear only once a run is logged or searched."""
        from mlflow.tracking import MlflowClient

        if folder := sqlite_folder(self.uri):
            folder.mkdir(parents=True, exist_ok=True)
        return MlflowClient(tracking_uri=self.uri, registry_uri=self.uri)

    @classmethod
    def connect(cls, cfg: Config) -> "Tracker":
        storage = storage_path(cfg)
        uri = resolve_tracking_uri(cfg, storage)
        check_tracking(uri, cfg.tracking.timeout_s)
        return cls(uri, cfg.tracking.experiment, storage, cfg.tracking.timeout_s)

    def _experiment_id(self, create: bool) -> Optional[str]:
        experiment = self.client.get_experiment_by_name(self.experiment)
        if experiment is None and not create:
            return None
        experiment_id = (experiment.experiment_id if experiment else self.client.create_experiment(
            self.experiment, artifact_location=artifact_location(self.uri, self.storage or ".")))
        if create and (experiment is None
                       or experiment.tags.get(EXPERIMENT_KIND[0]) != EXPERIMENT_KIND[1]):
            self.client.set_experiment_tag(experiment_id, *EXPERIMENT_KIND)
        return experiment_id

    def find_run(self, tags: dict[str, str]):
        """The newest run of the experiment carrying every ``tags`` item, or None."""
        experiment_id = self._experiment_id(create=False)
        if experiment_id is None:
            return None
        found = self.client.search_runs([experiment_id], tag_filter(tags), max_results=1)
        return found[0] if found else None

    def open_run(self, cfg: Config, run_name: str, parent_run_id: Optional[str] = None,
                 tags: Optional[dict[str, str]] = None) -> str:
        """The run of ``run_name`` (reopened on resume), or a new one with the config's
        params, tags and the resolved config as an artifact."""
        experiment_id = self._experiment_id(create=True)
        found = self.find_run({RUN_NAME_TAG: run_name})
        if found is not None:
            self.client.update_run(found.info.run_id, status="RUNNING")
            return found.info.run_id
        all_tags = run_tags(cfg, run_name) | (tags or {})
        if parent_run_id:
            all_tags["mlflow.parentRunId"] = parent_run_id
        run_id = self.client.create_run(experiment_id, run_name=run_name,
                                        tags=all_tags).info.run_id
        from mlflow.entities import Param

        params = [Param(k, str(v)) for k, v in cfg.flat().items()]
        for i in range(0, len(params), 100):
            self.client.log_batch(run_id, params=params[i:i + 100])
        self.client.log_text(run_id, cfg.to_yaml(), "config/config.yaml")
        return run_id

    def log_metrics(self, run_id: str, metrics: dict[str, float], step: int = 0) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in metrics.items()]
        for i in range(0, len(batch), 200):  # MLflow's limit per batch is 1,000 items
            self.client.log_batch(run_id, metrics=batch[i:i + 200])

    def log_artifact(self, run_id: str, path: str | Path, artifact_path: Optional[str] = None
                     ) -> None:
        """A file, or every file of a directory, under ``artifact_path``."""
        if Path(path).is_dir():
            self.client.log_artifacts(run_id, str(path), artifact_path)
        else:
            self.client.log_artifact(run_id, str(path), artifact_path)

    def run_tags(self, run_id: str) -> dict[str, str]:
        return dict(self.client.get_run(run_id).data.tags)

    def set_tags(self, run_id: str, tags: dict[str, str]) -> None:
        for key, value in tags.items():
            self.client.set_tag(run_id, key, value)

    def metric_history(self, run_id: str, key: str) -> list[tuple[int, float]]:
        """(step, value) of every logged point of ``key``, in logging order."""
        return [(m.step, m.value) for m in self.client.get_metric_history(run_id, key)]

    def fetch(self, run_id: str, artifact_path: str, dst: Optional[str | Path] = None
              ) -> Optional[Path]:
        """A local copy of one logged artifact (file or directory), or None when the run has
        none at that path."""
        parent = str(Path(artifact_path).parent)
        listed = self.client.list_artifacts(run_id, None if parent == "." else parent)
        if not any(a.path == artifact_path for a in listed):
            return None
        return Path(self.client.download_artifacts(run_id, artifact_path,
                                                   str(dst) if dst else None))

    @property
    def model_name(self) -> str:
        """The registered model of this experiment's teacher backbones (a version per run)."""
        return f"{self.experiment}-teacher"

    def register_model(self, run_id: str, tags: dict[str, str]) -> str:
        """Register the run's logged ``model/`` (the teacher backbone) as a version of
        :attr:`model_name`, once per run; returns the version."""
        if (found := self.model_version(run_id)) is not None:
            return found
        if not self.client.search_registered_models(f"name = '{self.model_name}'"):
            self.client.create_registered_model(
                self.model_name, description="AttMask teacher backbones (timm key names, "
                "safetensors); one version per pretraining run")
        version = self.client.create_model_version(self.model_name, f"runs:/{run_id}/model",
                                                   run_id=run_id, tags=tags)
        self.client.set_tag(run_id, "model_version", f"{self.model_name}/{version.version}")
        return str(version.version)

    def model_version(self, run_id: str) -> Optional[str]:
        """The registered version of ``run_id``'s backbone, if it has one."""
        if not re.fullmatch(r"[0-9a-f]{32}", run_id):
            raise UserError(f"run id {run_id!r}: expected 32 hex digits")
        found = self.client.search_model_versions(
            f"name = '{self.model_name}' and run_id = '{run_id}'")
        return str(found[0].version) if found else None

    def tag_model_version(self, version: str, tags: dict[str, str]) -> None:
        for key, value in tags.items():
            self.client.set_model_version_tag(self.model_name, version, key, value)

    def finish(self, run_id: str, status: str = "FINISHED") -> None:
        """Close the run; a store that went away was already reported by the logger."""
        try:
            self.client.set_terminated(run_id, status)
        except Exception:  # noqa: BLE001
            log.warning("could not mark MLflow run %s %s", run_id, status)


class AsyncRunLogger:
    """Logs metrics and artifacts from a background thread.

    The training step only enqueues. When the tracking server goes away mid-run, calls fail in
    the thread, are counted and reported once; training carries on. A full queue drops the
    oldest item rather than blocking.
    """

    def __init__(self, uri: str, run_id: str, timeout_s: float = 5.0, max_queue: int = 10_000):
        self.tracker, self.run_id = Tracker(uri, timeout_s=timeout_s), run_id
        self.queue: queue.Queue = queue.Queue(maxsize=max_queue)
        self.errors, self.dropped, self.last_error = 0, 0, ""
        self._thread = threading.Thread(target=self._work, name="mlflow-logger", daemon=True)
        self._thread.start()

    def metrics(self, metrics: dict[str, float], step: int) -> None:
        self._put(("metrics", {k: float(v) for k, v in metrics.items()}, step))

    def artifact(self, path: str | Path, artifact_path: Optional[str] = None) -> None:
        self._put(("artifact", str(path), artifact_path))

    def image(self, png: bytes, artifact_file: str) -> None:
        self._put(("image", png, artifact_file))

    def _put(self, item: tuple) -> None:
        while True:
            try:
                self.queue.put_nowait(item)
                return
            except queue.Full:
                try:
                    self.queue.get_nowait()
                    self.queue.task_done()
                    self.dropped += 1
                except queue.Empty:
                    pass

    def _work(self) -> None:
        while True:
            item = self.queue.get()
            if item is None:
                self.queue.task_done()
                return
            try:
                kind = item[0]
                if kind == "metrics":
                    self.tracker.log_metrics(self.run_id, item[1], item[2])
                elif kind == "artifact":
                    self.tracker.log_artifact(self.run_id, item[1], item[2])
                else:
                    with tempfile.TemporaryDirectory() as d:
                        path = Path(d) / Path(item[2]).name
                        path.write_bytes(item[1])
                        self.tracker.log_artifact(self.run_id, path, str(Path(item[2]).parent))
            except Exception as exc:  # noqa: BLE001 - logging must never stop training
                self.errors += 1
                self.last_error = f"{exc.__class__.__name__}: {str(exc)[:200]}"
                if self.errors == 1:
                    log.warning("MLflow logging failed (%s); training continues, further "
                                "failures are counted", self.last_error)
            finally:
                self.queue.task_done()

    def flush(self, timeout_s: float) -> bool:
        """Wait, at most ``timeout_s``, until everything queued so far has been sent."""
        deadline = time.monotonic() + timeout_s
        with self.queue.all_tasks_done:
            while self.queue.unfinished_tasks:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self.queue.all_tasks_done.wait(remaining)
        return True

    def close(self, timeout_s: float = 60.0) -> dict[str, Any]:
        """Flush (bounded in time) and return the failure counts."""
        self._put(None)
        self._thread.join(timeout_s)
        return {"errors": self.errors, "dropped": self.dropped, "last_error": self.last_error,
                "flushed": not self._thread.is_alive()}

