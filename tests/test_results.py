"""The shape of results.json in one place (attmask/eval/results.py), read by MLflow and reports."""
from attmask.eval.results import KNN_TOP1, lookup, metric_paths
from pipelines.evaluate import flat_metrics

PART = {"knn": {"k20": {"top1": 0.5, "top5": 0.9}},
        "linear": {"top1": 0.6, "val_top1": 0.55, "epoch": 7, "n_last_blocks": 4},
        "fewshot": {"1": {"mean": 0.2, "std": 0.01, "splits": 5}, "20": {"skipped": "few"}},
        "robustness": {"variants": {"mixed_same": 0.7, "mixed_rand": 0.5}, "bg_gap": 0.2},
        "attention": {"topk_on_object": 0.3, "skipped_not": "x"},
        "finetune": {"top1": 0.65, "epochs": 3}}


def test_every_scalar_metric_is_named_once_with_its_path():
    paths = metric_paths(PART)
    assert paths == {
        "knn_k20_top1": KNN_TOP1, "knn_k20_top5": ("knn", "k20", "top5"),
        "linear_top1": ("linear", "top1"), "linear_val_top1": ("linear", "val_top1"),
        "fewshot_1_mean": ("fewshot", "1", "mean"), "fewshot_1_std": ("fewshot", "1", "std"),
        "robustness_mixed_same": ("robustness", "variants", "mixed_same"),
        "robustness_mixed_rand": ("robustness", "variants", "mixed_rand"),
        "bg_gap": ("robustness", "bg_gap"),
        "attention_topk_on_object": ("attention", "topk_on_object"),
        "finetune_top1": ("finetune", "top1")}
    assert lookup(PART, ("fewshot", "20", "mean")) is None and lookup({}, KNN_TOP1) is None
    assert lookup({"x": True}, ("x",)) is None  # a flag is not a metric


def test_mlflow_names_follow_the_paths_for_the_run_and_its_baselines():
    flat = flat_metrics({**PART, "baselines": {"init": {"knn": PART["knn"]}}, "wall_s": 3.0})
    assert flat["eval/knn_k20_top1"] == 0.5 and flat["eval/finetune_top1"] == 0.65
    assert flat["eval/init/knn_k20_top1"] == 0.5 and "eval/init/linear_top1" not in flat
    assert len(flat) == len(metric_paths(PART)) + 2 and "eval/wall_s" not in flat
