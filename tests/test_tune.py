"""Search spaces (validated before any trial) and a real 4-trial ASHA search on Ray."""
import csv

import pytest
import yaml
from mlflow.tracking import MlflowClient

from attmask.config import load_config
from attmask.errors import ConfigError
from attmask.train import pretrain_local
from conftest import ROOT, tiny_yaml
from pipelines.tune import load_spec, plan, run_tune


def tiny_base(tmp_path, data=None):
    return tiny_yaml(tmp_path / "base.yaml", *([f"data.path={data}"] if data else []))


def write_search(tmp_path, **fields):
    spec = {"base": str(tiny_base(tmp_path)), "space": {"masking.prob": {"uniform": [0.2, 0.8]}},
            **fields}
    path = tmp_path / "search.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_shipped_search_files_validate():
    names = {p.stem for p in (ROOT / "tune_configs").glob("*.yaml")}
    assert {"mask_ratio", "attention_layer", "hints", "strategy", "paper_ablations"} <= names
    for name in names:
        spec, base = load_spec(ROOT / "tune_configs" / f"{name}.yaml")
        assert "trial(s)" in plan(spec, base)


@pytest.mark.parametrize("fields, message", [
    ({"space": {"masking.nope": {"choice": [1]}}}, r"space\['masking.nope'\].*not a config key"),
    ({"space": {"masking.prob": {"uniform": [0.5, 0.5]}}}, r"space\['masking.prob'\]: empty range"),
    ({"space": {"masking.prob": {"uniform": [0.5, 1.5]}}},
     r"space\['masking.prob'\]: value 1.5 is not allowed.*masking.prob=1.5"),
    ({"space": {"masking.strategy": {"choice": ["random", "nope"]}}},
     r"space\['masking.strategy'\]: value 'nope'"),
    ({"space": {"masking.prob": {"choice": []}}}, "non-empty list"),
    ({"space": {"masking.prob": {"normal": [0, 1]}}}, "unknown sampler 'normal'"),
    ({"space": {"masking.layer": {"randint": [-2, 5]}}}, r"value 4 is not allowed"),
    ({"space": {"masking.prob": {"uniform": [0.2, 0.8]}}, "search": "grid"}, "search: grid needs"),
    ({"mode": "maximum"}, "mode='maximum'"),
    ({"colour": "red"}, "unknown key 'colour'"),
    ({"scheduler": {"type": "asha", "max_t": 50}}, "more than train.epochs=2"),
    ({"scheduler": {"type": "asha", "time_attr": "training_iteration"}}, "time unit is the epoch"),
    ({"resources_per_trial": {"gpus": 1}}, "resources_per_trial.gpus"),
])
def test_invalid_search_files_name_the_entry(tmp_path, fields, message):
    with pytest.raises(ConfigError, match=message):
        load_spec(write_search(tmp_path, **fields))


def test_names_derive_from_the_resolved_yaml(tmp_path):
    path = write_search(tmp_path)
    a, _ = load_spec(path)
    b, _ = load_spec(path)
    c, _ = load_spec(path, ["train.epochs=1"])
    assert a.search_name == b.search_name != c.search_name


@pytest.mark.ray
def test_four_trial_asha_search_stops_the_bad_arm_and_best_config_reruns(
        ray_local, synthetic_dir, tmp_path):
    base = tiny_base(tmp_path, synthetic_dir)
    spec_file = tmp_path / "asha.yaml"
    spec_file.write_text(yaml.safe_dump({
        "base": str(base),
        "overrides": {"train.output_dir": str(tmp_path / "runs"), "train.steps_per_epoch": 3,
                      "data.local_crops_number": 1, "tracking.log_images_every_epochs": 0,
                      "train.knn_every_epochs": 0},  # ranked on loss: no monitor needed
        # zero learning rate is the deliberately bad arm; in this order ASHA must stop a trial
        # at epoch 1 whichever of the two arms scores lower (values of equal arms tie exactly)
        "space": {"optim.lr": {"grid": [0.05, 0.0, 0.0, 0.05]}},
        "metric": "loss", "mode": "min", "num_samples": 1, "search": "grid",
        "scheduler": {"type": "asha", "time_attr": "epoch", "grace_period": 1,
                      "reduction_factor": 2, "max_t": 2},
        "resources_per_trial": {"workers": 1, "cpus_per_worker": 1}, "max_concurrent": 1}))
    spec, cfg = load_spec(spec_file)
    result = run_tune(spec, cfg, log=lambda s: None)
    assert len(result.rows) == 4 and all(r["status"] != "error" for r in result.rows)
    assert any(r["status"] == "stopped early" and r["epochs"] == 1.0 for r in result.rows)
    assert any(r["status"] == "completed" and r["epochs"] == 2.0 for r in result.rows)
    with open(result.out_dir / "results.csv") as f:
        assert len(list(csv.DictReader(f))) == 4
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'runs' / 'ray' / 'mlflow.db'}")
    exp = client.get_experiment_by_name("attmask")
    children = client.search_runs([exp.experiment_id],
                                  f"tags.mlflow.parentRunId = '{result.parent_run_id}'")
    assert len(children) == 4 and {c.data.params["optim.lr"] for c in children} == {"0.05", "0.0"}
    artifacts = {a.path for a in client.list_artifacts(result.parent_run_id, "tune")}
    assert {"tune/results.csv", "tune/metric_vs_params.png", "tune/best_config.yaml"} <= artifacts
    # the best config is a complete config that `pretrain --config` accepts as is (trained
    # here by the same loop in this process: a Ray Train run would only add its start-up)
    best = load_config(path=result.best_config_path)
    assert best.optim.lr == result.best["optim.lr"] and best.train.run_name is None
    rerun = pretrain_local(best, log=lambda s: None)
    assert rerun.steps == 6
    # running the same search again resumes it (everything already finished)
    again = run_tune(spec, cfg, log=lambda s: None)
    assert again.search_name == result.search_name and len(again.rows) == 4


@pytest.mark.parametrize("search", sorted(p.name for p in (ROOT / "tune_configs").glob("*.yaml")))
def test_every_shipped_search_ranks_trials_on_val_and_says_so(search):
    """Searches used to rank trials on the test split; they read val, and the plan and
    best_config.yaml name the split. A search that asks for test is marked."""
    from pipelines.tune import selection_note

    spec, base = load_spec(ROOT / "tune_configs" / search)
    if spec.metric.startswith("knn"):
        assert base.train.knn_split == "val"
        assert "on the 'val' split" in plan(spec, base)
        assert "'val' split" in selection_note(spec, base)
        assert "SELECTED ON TEST" not in selection_note(spec, base)
    spec, base = load_spec(ROOT / "tune_configs" / search, ["train.knn_split=test"])
    if spec.metric.startswith("knn"):
        assert "SELECTED ON TEST" in plan(spec, base)
        assert "SELECTED ON TEST" in selection_note(spec, base)
