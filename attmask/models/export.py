"""The teacher backbone as a file any timm user can load, and loading it back in one call.

A pretraining run exports its teacher backbone as safetensors with timm's key names. The file
also carries its architecture in the safetensors metadata, so neither :func:`load_backbone` nor
``timm.create_model`` needs the user to retype image size, patch size or depth::

    import attmask
    model = attmask.load_backbone("models:/attmask-teacher/3")       # or a file, a run folder

    import json, timm
    from safetensors import safe_open
    with safe_open(path, "pt") as f:
        meta = f.metadata()
    model = timm.create_model(meta["timm_model"], pretrained=True,
                              pretrained_cfg_overlay=dict(file=path), **json.loads(meta["timm_kwargs"]))
"""
from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path
from typing import Optional, cast

import yaml
from timm.models.vision_transformer import VisionTransformer

from attmask import __version__
from attmask.config import Config, ModelConfig, from_dict
from attmask.errors import UserError
from attmask.models.vit import MaskedViT, build_backbone, timm_architecture, with_stem
from attmask.runtime import load_checkpoint

FORMAT = "attmask-backbone/1"
BACKBONE_FILE = "teacher_backbone.safetensors"
# MLflow's artifact URIs (runs:/ID/path, models:/NAME/VERSION, models:/NAME@ALIAS).
MLFLOW_URI = re.compile(r"(runs|models):/.+")
# Where the pipeline keeps its tracking database unless tracking.uri says otherwise.
DEFAULT_TRACKING_URI = "sqlite:///runs/ray/mlflow.db"


def save_backbone(backbone: MaskedViT, cfg: Config, path: str | Path) -> Path:
    """Write ``backbone``'s weights (timm keys, no mask token) with its architecture and the
    run's resolved config in the file's metadata."""
    from safetensors.torch import save_file

    name, kwargs = timm_architecture(cfg.model)
    state = {k: v.detach().cpu().contiguous() for k, v in backbone.backbone_state_dict().items()}
    save_file(state, str(path), metadata={
        "format": FORMAT, "attmask_version": __version__, "timm_model": name,
        "timm_kwargs": json.dumps(kwargs), "stem": cfg.model.stem, "config": cfg.to_yaml()})
    return Path(path)


def read_metadata(path: str | Path) -> dict[str, str]:
    """The safetensors metadata of ``path`` ({} for a file written without it)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            return dict(f.metadata() or {})
    except Exception as exc:  # noqa: BLE001 - a torn or foreign file
        raise UserError(f"checkpoint {path} is not a readable .safetensors file "
                        f"({str(exc).splitlines()[0][:160]})") from exc


def build_timm_backbone(cfg: ModelConfig) -> VisionTransformer:
    """A plain timm ``VisionTransformer`` with this backbone's architecture (random weights)."""
    import timm

    name, kwargs = timm_architecture(cfg)
    model = cast(VisionTransformer, timm.create_model(name, pretrained=False, **kwargs))
    return with_stem(model, cfg)


def resolve_reference(ref: str | Path, tracking_uri: Optional[str] = None,
                      dst: Optional[str | Path] = None) -> Path:
    """A local file for a backbone reference: a ``.safetensors`` file, a checkpoint
    (``state.pt`` or a directory holding one), a run folder holding the exported backbone, or an
    MLflow URI (``models:/NAME/VERSION``, ``runs:/RUN_ID/model``), downloaded from
    ``tracking_uri`` (default: ``$MLFLOW_TRACKING_URI``, else the pipeline's own
    ``sqlite:///runs/ray/mlflow.db``) into ``dst`` (default: a new temporary folder)."""
    text = str(ref)
    if MLFLOW_URI.fullmatch(text):
        path = _download(text, tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
                         or DEFAULT_TRACKING_URI, dst)
    else:
        path = Path(text)
    if path.is_dir():
        for candidate in (path / BACKBONE_FILE, path / "state.pt"):
            if candidate.is_file():
                return candidate
        raise UserError(f"{ref}: the folder holds neither {BACKBONE_FILE} nor state.pt")
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path} (allowed: a .safetensors file, a "
                        "state.pt or a folder holding one, models:/NAME/VERSION, runs:/ID/PATH)")
    return path


def _download(uri: str, tracking_uri: str, dst: Optional[str | Path]) -> Path:
    # MLflow is imported only here: the library itself runs without a tracking store.
    import mlflow
    from mlflow.exceptions import MlflowException

    if tracking_uri.startswith("sqlite:///"):
        db = Path(tracking_uri.removeprefix("sqlite:///"))
        if not db.is_file():  # MLflow would create an empty database and find nothing in it
            raise UserError(f"{uri}: tracking database {db} does not exist (set "
                            "MLFLOW_TRACKING_URI or pass tracking_uri)")
    mlflow.set_registry_uri(tracking_uri)
    try:
        local = mlflow.artifacts.download_artifacts(
            artifact_uri=uri, tracking_uri=tracking_uri,
            dst_path=str(dst) if dst else tempfile.mkdtemp(prefix="attmask-backbone-"))
    except MlflowException as exc:
        raise UserError(f"{uri}: not found in {tracking_uri} "
                        f"({str(exc).splitlines()[0][:160]})") from exc
    return Path(local)


def load_backbone(ref: str | Path, *, tracking_uri: Optional[str] = None,
                  config: Optional[Config] = None) -> VisionTransformer:
    """The trained teacher backbone of ``ref`` as a ready timm ``VisionTransformer`` in eval
    mode (``num_classes=0``: ``model(images)`` returns the [CLS] features).

    ``ref`` is anything :func:`resolve_reference` takes. ``config`` is needed only for a
    ``.safetensors`` file written before files carried their architecture.
    """
    path = resolve_reference(ref, tracking_uri)
    teacher, cfg = load_teacher(path, config)
    model = build_timm_backbone(cfg.model)
    model.load_state_dict(teacher.backbone_state_dict())
    return model.eval()


def load_teacher(checkpoint: str | Path, config: Optional[Config] = None
                 ) -> tuple[MaskedViT, Config]:
    """Teacher backbone (with its mask token) and the run's config, from a full checkpoint
    (``state.pt``, or a directory holding one) or an exported ``.safetensors`` file. The file's
    metadata carries the config; ``config`` stands in for it in a file written without one.
    ``config``'s data and tracking sections replace the checkpoint's (they name this machine's
    paths, not the training machine's). Strict: weights that do not fit are an error."""
    path = Path(checkpoint)
    if path.is_dir():
        path = path / "state.pt"
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        written = read_metadata(path).get("config")
        if written is None and config is None:
            raise UserError(f"{path}: a .safetensors backbone without architecture metadata "
                            "needs --config/--preset for its architecture")
        try:
            state = load_file(str(path))
        except Exception as exc:  # noqa: BLE001 - a torn or foreign file
            raise UserError(f"checkpoint {path} is not a readable .safetensors file "
                            f"({str(exc).splitlines()[0][:160]})") from exc
        cfg = _with_local_sections(written, config) if written is not None else config
        assert cfg is not None  # one of the two, checked above
    else:
        full = load_checkpoint(path)
        if "teacher" not in full or "config" not in full:
            raise UserError(f"checkpoint {path} has no 'teacher' and 'config' entries "
                            "(not an attmask training checkpoint)")
        cfg = _with_local_sections(full["config"], config)
        prefix = "backbone."
        state = {k[len(prefix):]: v for k, v in full["teacher"].items() if k.startswith(prefix)}
    backbone = build_backbone(cfg.model, drop_path=0.0)
    expected = set(backbone.state_dict()) - {"mask_token"}
    missing = sorted(expected - set(state))
    unexpected = sorted(set(state) - expected - {"mask_token"})
    wrong = sorted(k for k in expected & set(state)
                   if tuple(state[k].shape) != tuple(backbone.state_dict()[k].shape))
    if missing or unexpected or wrong:
        detail = "; ".join(f"{what}: {', '.join(keys[:4])}{' ...' if len(keys) > 4 else ''}"
                           for what, keys in (("missing keys", missing),
                                              ("unexpected keys", unexpected),
                                              ("shape mismatch", wrong)) if keys)
        raise UserError(f"checkpoint {path} does not fit model {describe(cfg.model)} ({detail})")
    backbone.load_state_dict(state, strict=False)  # only mask_token may be absent
    return backbone.eval(), cfg


def _with_local_sections(written: str, local: Optional[Config]) -> Config:
    cfg = from_dict(yaml.safe_load(written)).validate()
    if local is not None:
        cfg.tracking, cfg.data = local.tracking, local.data
    return cfg


def describe(m: ModelConfig) -> str:
    dim, depth, heads = m.dims
    return f"{m.arch} (dim {dim}, depth {depth}, {heads} heads, patch {m.patch_size}, {m.image_size} px)"
