"""The shape of ``results.json`` (one evaluation), defined once.

The TypedDicts document what each part of the suite returns; :func:`metric_paths` names every
scalar metric in it. The MLflow flattening (``pipelines/evaluate.py``) and the benchmark report
(``pipelines/report.py``) both read results through these names and paths.
"""
from __future__ import annotations

import base64
import hashlib
from typing import Optional, Sequence, TypedDict

import numpy as np

Path = tuple[str, ...]

HITS_K = 20  # the k-NN whose per-image hits are kept: the headline k of KNN_TOP1
# Raised when results gain a field, so that cached baseline results without it are recomputed
# (2: per-image k-NN hits).
FORMAT = 2


class TopK(TypedDict, total=False):
    top1: float
    top5: float
    n: int  # test images (absent in results written before it was recorded)
    # Per test image, whether top-1 is right (k = HITS_K only): two models evaluated on the
    # same images (equal ``images`` digests) are then compared image by image.
    hits: str  # np.packbits of the booleans, base64: 10,000 images take 1.7 kB
    images: str  # digest of the test images' keys, in order


class LinearResult(TypedDict):
    top1: float
    val_top1: float
    epoch: int  # selected on the validation split, 1-based
    n_last_blocks: int


class FewshotResult(TypedDict, total=False):
    mean: float
    std: float
    splits: int
    skipped: str  # too few images per class


class RobustnessResult(TypedDict, total=False):
    variants: dict[str, float]  # test variant -> linear-probe accuracy
    bg_gap: float  # mixed_same - mixed_rand
    skipped: str


class AttentionResult(TypedDict, total=False):
    topk_on_object: float
    masked_on_object: float
    object_share: float
    top_fraction: float
    mask_ratio: float
    skipped: str


class FinetuneResult(TypedDict, total=False):
    top1: float
    epochs: int
    steps: int
    train_images: int
    lr: float
    layer_decay: float
    last_loss: float
    skipped: str


class PartResults(TypedDict, total=False):
    knn: dict[str, TopK]  # "k20" -> accuracies
    linear: LinearResult
    fewshot: dict[str, FewshotResult]  # images per class -> accuracy over splits
    robustness: RobustnessResult
    attention: AttentionResult
    finetune: FinetuneResult


class Results(PartResults, total=False):
    checkpoint: str
    data: str
    baselines: dict[str, PartResults]  # "init", "pixels" -> the same parts
    wall_s: float
    mlflow_run_id: str


KNN_TOP1: Path = ("knn", "k20", "top1")
KNN_TOP5: Path = ("knn", "k20", "top5")
KNN_N: Path = ("knn", "k20", "n")
LINEAR_TOP1: Path = ("linear", "top1")
LINEAR_VAL_TOP1: Path = ("linear", "val_top1")
BG_GAP: Path = ("robustness", "bg_gap")
FINETUNE_TOP1: Path = ("finetune", "top1")


def encode_hits(hits: np.ndarray, keys: Sequence[str]) -> dict[str, str]:
    """``{"hits", "images"}`` of a :class:`TopK` for per-image booleans in the order of ``keys``."""
    hits = np.asarray(hits, dtype=bool)
    if len(hits) != len(keys):
        raise ValueError(f"{len(hits)} hits for {len(keys)} test images")
    return {"hits": base64.b64encode(np.packbits(hits).tobytes()).decode("ascii"),
            "images": hashlib.sha256("\n".join(keys).encode()).hexdigest()[:16]}


def decode_hits(entry: TopK) -> Optional[tuple[np.ndarray, str]]:
    """(per-image booleans, digest of the test images), or None for results without them."""
    if "hits" not in entry or "images" not in entry or "n" not in entry:
        return None
    packed = np.frombuffer(base64.b64decode(entry["hits"]), dtype=np.uint8)
    return np.unpackbits(packed, count=int(entry["n"])).astype(bool), entry["images"]


def lookup(results: PartResults, path: Path) -> Optional[float]:
    """The value at ``path``, or None where the part or the key is absent."""
    node: object = results
    for key in path:
        if not isinstance(node, dict) or key not in node:
            return None
        node = node[key]
    return float(node) if isinstance(node, (int, float)) and not isinstance(node, bool) else None


def metric_paths(results: PartResults) -> dict[str, Path]:
    """Every scalar metric present in ``results``: flat name (``knn_k20_top1``) -> path."""
    paths: dict[str, Path] = {}
    for k in results.get("knn", {}):
        paths[f"knn_{k}_top1"], paths[f"knn_{k}_top5"] = ("knn", k, "top1"), ("knn", k, "top5")
    paths["linear_top1"], paths["linear_val_top1"] = LINEAR_TOP1, LINEAR_VAL_TOP1
    for nu in results.get("fewshot", {}):
        paths[f"fewshot_{nu}_mean"] = ("fewshot", nu, "mean")
        paths[f"fewshot_{nu}_std"] = ("fewshot", nu, "std")
    for name in results.get("robustness", {}).get("variants", {}):
        paths[f"robustness_{name}"] = ("robustness", "variants", name)
    paths["bg_gap"] = BG_GAP
    for name in results.get("attention", {}):
        paths[f"attention_{name}"] = ("attention", name)
    paths["finetune_top1"] = FINETUNE_TOP1
    return {name: path for name, path in paths.items() if lookup(results, path) is not None}
