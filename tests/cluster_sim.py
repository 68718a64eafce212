"""A simulated multi-node Ray cluster on this machine, driven as a separate process by
tests/test_multinode.py (a pytest process already holds its own local Ray instance).

    python tests/cluster_sim.py SCENARIO SPEC_JSON

starts a head with no CPUs (``head_cpus`` in the spec; the driver and Train's controller live
there, no training worker fits) and worker "nodes" ``node_a`` and ``node_b`` with one CPU each
and a resource named after them, runs the scenario against the cluster's address, stops
every process it started and prints one line ``RESULT {json}``.
"""
from __future__ import annotations

import json
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]


def pretrain_node_loss(cluster, nodes: dict, spec: dict) -> dict:
    """Pretrain with one worker per node; once the first checkpoint is registered node_b dies
    (all its processes, SIGKILL) and a replacement node_c joins; the run resumes from that
    checkpoint and finishes.
    Nodes are started and stopped from the main thread (Ray's node objects install signal
    handlers), so the run itself goes in a thread."""
    from attmask.config import load_config
    from pipelines.pretrain import run_pretrain

    cfg = load_config(path=spec["config"], overrides=spec["overrides"])
    run_dir = Path(cfg.ray.storage_path) / cfg.train.run_name
    names = {node.node_id: name for name, node in nodes.items()}
    names[cluster.head_node.node_id] = "head"
    outcome: dict = {}

    def train() -> None:
        try:
            outcome["result"] = run_pretrain(cfg, address=cluster.address, log=print)
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            outcome["error"] = exc

    runner = threading.Thread(target=train, daemon=True)
    runner.start()
    while not (before := registered_checkpoint(run_dir)) and runner.is_alive():
        time.sleep(0.05)
    print(f"killing node_b after {before or 'no checkpoint'}", flush=True)
    start = time.perf_counter()
    cluster.remove_node(nodes.pop("node_b"), allow_graceful=False)
    nodes["node_c"] = cluster.add_node(num_cpus=1, resources={"node_c": 1})
    names[nodes["node_c"].node_id] = "node_c"
    recovery = None
    while runner.is_alive():
        if recovery is None and registered_checkpoint(run_dir) not in (None, before):
            recovery = time.perf_counter() - start  # loss -> the next registered checkpoint
        time.sleep(0.05)
    if "error" in outcome:
        raise outcome["error"]
    result = outcome["result"]
    return {"steps": result.steps, "rank0_node": names.get(result.node_id, result.node_id),
            "workers": [names.get(n, n) for n in worker_actors()[1]],
            "mlflow_run_id": result.mlflow_run_id, "recovery_s": recovery,
            "killed_after": before}


def tune_across_nodes(cluster, nodes: dict, spec: dict) -> dict:
    """A 4-trial search, two trials at a time: each trial's driver (0.01 CPU) and its one Ray
    Train worker (0.99 CPU) fill one worker node, so the trials land on both. Once the trial on
    node_b has checkpointed, node_b dies and node_c joins: that trial (its Train worker group,
    or, if its driver died too, Tune's retry) resumes from its checkpoint; the search
    completes."""
    from pipelines.tune import load_spec, run_tune

    search, base = load_spec(spec["search"], spec["overrides"])
    storage = Path(base.ray.storage_path)
    names = {node.node_id: name for name, node in nodes.items()}
    names[cluster.head_node.node_id] = "head"
    outcome: dict = {}

    def search_thread() -> None:
        try:
            outcome["result"] = run_tune(search, base, address=cluster.address, log=print)
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            outcome["error"] = exc

    def b_is_training_from_a_checkpoint() -> bool:
        # Every trial's Train run writes a marker into its storage directory when it starts.
        # Once every started run has a registered checkpoint (at least two: one per worker
        # node) and a worker is alive on node_b, the trial on node_b has a checkpoint to resume
        # from, even when node_b started late and node_a has finished a trial meanwhile.
        started = {p.parent for p in storage.glob("*/.validate_storage_marker")}
        checkpointed = {d for d in started if registered_checkpoint(d)}
        alive = worker_actors(alive_only=True)[1]
        return (len(checkpointed) >= 2 and started <= checkpointed
                and nodes["node_b"].node_id in alive)

    runner = threading.Thread(target=search_thread, daemon=True)
    runner.start()
    while runner.is_alive() and not b_is_training_from_a_checkpoint():
        time.sleep(0.2)
    killed = runner.is_alive()
    if killed:
        print("killing node_b", flush=True)
        cluster.remove_node(nodes.pop("node_b"), allow_graceful=False)
        nodes["node_c"] = cluster.add_node(num_cpus=1, resources={"node_c": 1})
        names[nodes["node_c"].node_id] = "node_c"
    runner.join()
    if "error" in outcome:
        raise outcome["error"]
    result = outcome["result"]
    return {"rows": result.rows, "killed": killed,
            "workers": [names.get(n, n) for n in worker_actors()[1]]}


def registered_checkpoint(run_dir: Path) -> Optional[str]:
    """The newest checkpoint Ray Train's controller has registered for a run (the one a
    restarted worker group gets), from the snapshot it writes after each registration. A
    checkpoint directory appears earlier, when the worker uploads it: a node lost between the
    two restarts the run from scratch."""
    try:
        snapshot = json.loads((run_dir / "checkpoint_manager_snapshot.json").read_text())
    except (OSError, ValueError):  # not written yet, or caught mid-write
        return None
    return (snapshot.get("latest_checkpoint_result") or {}).get("checkpoint_dir_name")


def worker_actors(alive_only: bool = False) -> tuple[list[str], list[str]]:
    """(actor ids, node ids) of every Ray Train worker so far (or of the living ones)."""
    from ray.util.state import list_actors

    filters = [("class_name", "=", "RayTrainWorker")] + ([("state", "=", "ALIVE")]
                                                          if alive_only else [])
    actors = list_actors(filters=filters, detail=True, limit=1000,
                         raise_on_missing_output=False)
    return [a.actor_id for a in actors], [a.node_id for a in actors]


SCENARIOS = {"pretrain_node_loss": pretrain_node_loss, "tune_across_nodes": tune_across_nodes}


def main(scenario: str, spec: dict) -> dict:
    import ray
    from ray.cluster_utils import Cluster

    from conftest import free_port

    # The dashboard serves the State API (Train's placement-group cleaner, worker_actors).
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": spec.get("head_cpus", 0), "resources": {"head": 1}, "include_dashboard": True,
        "dashboard_host": "127.0.0.1", "dashboard_port": free_port()})
    try:
        nodes = {name: cluster.add_node(num_cpus=1, resources={name: 1})
                 for name in ("node_a", "node_b")}
        cluster.wait_for_nodes()
        ray.init(address=cluster.address)  # pipelines reuse this connection
        return SCENARIOS[scenario](cluster, nodes, spec)
    finally:
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    # A test that times out sends SIGTERM: stop the cluster's processes on the way out.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    print("RESULT " + json.dumps(main(sys.argv[1], json.loads(sys.argv[2]))), flush=True)
