"""Starting (or attaching to) Ray, once per command."""
from __future__ import annotations

import contextlib
import os
from typing import Iterator, Optional

# Train V2 polls worker reports every RAY_TRAIN_HEALTH_CHECK_INTERVAL_S (2 s by default), which
# makes every report a 2 s barrier; Train's print patch duplicates worker prints.
DEFAULT_ENV = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5", "RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}
# Train's preemption watcher follows node drains (spot instances) and costs an actor per run;
# a local instance has no node to drain, and the watcher's start printed an error-level line
# from Ray's core on every run (ray-project/ray#53727). Kept on clusters.
LOCAL_ENV = {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}


@contextlib.contextmanager
def ray_session(address: Optional[str] = None, num_cpus: Optional[int] = None) -> Iterator[None]:
    """A Ray instance for the duration of a command.

    Without ``address`` a new local instance is started (``address="local"``: never attaches by
    accident to a head someone else started) with logical CPUs oversubscribed so train workers
    and helper tasks fit on small machines; with ``address`` (``auto``, ``ray://...``) the
    running cluster is used. An instance that is already initialised (a test session, the
    benchmark) is reused and left running.
    """
    import ray

    for key, value in DEFAULT_ENV.items():
        os.environ.setdefault(key, value)
    if ray.is_initialized():
        yield
        return
    if address is None:  # local workers inherit this process's environment
        for key, value in LOCAL_ENV.items():
            os.environ.setdefault(key, value)
        cpus = max(num_cpus or 0, 2 * (os.cpu_count() or 1))
        # The dashboard serves the State API, which Train's placement-group cleaner needs to free
        # the workers of a run whose controller died (e.g. a trial stopped by Tune).
        ray.init(address="local", num_cpus=cpus, include_dashboard=True,
                 dashboard_host="127.0.0.1")
    else:
        ray.init(address=address,
                 runtime_env={"env_vars": {k: os.environ[k] for k in DEFAULT_ENV}})
    try:
        yield
    finally:
        ray.shutdown()


def alive_nodes() -> int:
    import ray

    return sum(1 for n in ray.nodes() if n.get("Alive"))


def check_fits(workers: int, cpus: float, gpus: float, what: str) -> None:
    """Fail at once, with what was asked and what the cluster has, when ``workers`` bundles of
    ``cpus`` CPUs and ``gpus`` GPUs each cannot be placed on the cluster's live nodes: Ray
    would otherwise wait for them forever (a GPU run on a machine without one hung)."""
    import ray

    from attmask.errors import UserError

    nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
    fit = 0
    for node in nodes:
        per_node = [node.get("CPU", 0) / cpus if cpus else float("inf")]
        if gpus:
            per_node.append(node.get("GPU", 0) / gpus)
        fit += int(min(per_node)) if min(per_node) != float("inf") else workers
    if fit >= workers:
        return
    has = "; ".join(f"node {i}: {n.get('CPU', 0):g} CPU, {n.get('GPU', 0):g} GPU"
                    for i, n in enumerate(nodes)) or "no live node"
    asked = f"{workers} x ({cpus:g} CPU" + (f", {gpus:g} GPU)" if gpus else ")")
    hint = " (ray.use_gpu=false, or a cluster with GPUs)" if gpus and not any(
        n.get("GPU", 0) for n in nodes) else ""
    raise UserError(f"{what}: asked for {asked}, and the cluster can place {fit} of them "
                    f"({has}){hint}")
