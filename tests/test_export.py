"""A trained backbone in one line: the exported file carries its architecture, and
``attmask.load_backbone`` (a file, a checkpoint, a run folder, an MLflow URI) and
``timm.create_model`` both rebuild the same network from it; ``attmask embed`` writes features."""
import json

import numpy as np
import pytest
import timm
import torch
from safetensors import safe_open

import attmask
from attmask.engine import Engine
from attmask.errors import UserError
from attmask.eval.features import embed_dataset
from attmask.models.export import BACKBONE_FILE, load_teacher
from attmask.train import export_teacher
from conftest import tiny_config
from run_pipeline import main


@pytest.fixture(scope="module", params=["linear", "hmlp"])
def trained(request, tmp_path_factory):
    """A tiny engine after one step and its exported backbone in a run folder."""
    engine = Engine(tiny_config(f"model.stem={request.param}"), steps_per_epoch=2)
    engine.train_step(torch.randn(2, 8, 3, 32, 32), torch.randn(2, 8, 3, 16, 16))
    run_dir = tmp_path_factory.mktemp("run")
    export_teacher(engine, run_dir / BACKBONE_FILE)
    engine.save(run_dir / "state.pt")
    return engine, run_dir


def features(model, images):
    with torch.no_grad():
        return model(images)


def test_every_reference_loads_the_teacher_as_a_timm_model(trained):
    engine, run_dir = trained
    images = torch.randn(3, 3, 32, 32)
    expected = engine.teacher.backbone.eval().cls_features(images).detach()
    for ref in (run_dir / BACKBONE_FILE, str(run_dir), run_dir / "state.pt"):
        model = attmask.load_backbone(ref)
        assert type(model) is timm.models.vision_transformer.VisionTransformer
        assert not model.training
        torch.testing.assert_close(features(model, images), expected)
    # a trained network, not a fresh one of the same shape
    fresh = Engine(engine.cfg, steps_per_epoch=2).teacher.backbone.eval().cls_features(images)
    assert not torch.allclose(fresh.detach(), expected)


def test_timm_create_model_loads_the_exported_file_from_its_metadata(trained):
    engine, run_dir = trained
    path = str(run_dir / BACKBONE_FILE)
    with safe_open(path, "pt") as f:
        meta = f.metadata()
    assert meta["format"] == "attmask-backbone/1" and meta["attmask_version"] == attmask.__version__
    if meta["stem"] != "linear":
        pytest.skip("timm has no hMLP stem: attmask.load_backbone builds it")
    model = timm.create_model(meta["timm_model"], pretrained=True,
                              pretrained_cfg_overlay=dict(file=path),
                              **json.loads(meta["timm_kwargs"])).eval()
    images = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(features(model, images),
                               engine.teacher.backbone.eval().cls_features(images).detach())


def test_a_file_without_metadata_still_needs_its_architecture(trained, tmp_path):
    from safetensors.torch import save_file

    engine, _ = trained
    state = {k: v.contiguous() for k, v in engine.teacher.backbone.backbone_state_dict().items()}
    save_file(state, str(tmp_path / "old.safetensors"))
    with pytest.raises(UserError, match="without architecture metadata needs --config"):
        attmask.load_backbone(tmp_path / "old.safetensors")
    model = attmask.load_backbone(tmp_path / "old.safetensors", config=engine.cfg)
    assert model.patch_embed.patch_size == (4, 4)


def test_references_that_name_nothing_are_one_clear_error(tmp_path):
    with pytest.raises(UserError, match="checkpoint not found: .*allowed: a .safetensors"):
        attmask.load_backbone(tmp_path / "nope.safetensors")
    with pytest.raises(UserError, match="holds neither teacher_backbone.safetensors nor state.pt"):
        attmask.load_backbone(tmp_path)
    with pytest.raises(UserError, match="tracking database .* does not exist"):
        attmask.load_backbone("models:/attmask-teacher/1",
                              tracking_uri=f"sqlite:///{tmp_path / 'none.db'}")
    (tmp_path / "torn.safetensors").write_bytes(b"\x08\x00\x00")
    with pytest.raises(UserError, match="not a readable .safetensors file"):
        attmask.load_backbone(tmp_path / "torn.safetensors")


def test_a_registered_model_version_loads_by_its_uri(trained, tmp_path):
    """The registry layout the pipeline writes (pipelines.tracking.Tracker.register_model): the
    run logs ``model/teacher_backbone.safetensors`` and a version points at ``runs:/ID/model``."""
    import mlflow
    from mlflow import MlflowClient

    engine, run_dir = trained
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    experiment = client.create_experiment("attmask", artifact_location=str(tmp_path / "art"))
    run = client.create_run(experiment)
    client.log_artifact(run.info.run_id, str(run_dir / BACKBONE_FILE), "model")
    client.create_registered_model("attmask-teacher")
    version = client.create_model_version("attmask-teacher", f"runs:/{run.info.run_id}/model",
                                          run_id=run.info.run_id)
    images = torch.randn(2, 3, 32, 32)
    expected = engine.teacher.backbone.eval().cls_features(images).detach()
    for ref in (f"models:/attmask-teacher/{version.version}", f"runs:/{run.info.run_id}/model"):
        torch.testing.assert_close(features(attmask.load_backbone(ref, tracking_uri=uri), images),
                                   expected)
    with pytest.raises(UserError, match="models:/attmask-teacher/7: not found in sqlite"):
        attmask.load_backbone("models:/attmask-teacher/7", tracking_uri=uri)
    mlflow.set_registry_uri("")  # leave the process's MLflow settings as they were


def test_embed_writes_the_features_the_evaluation_would_extract(trained, synthetic_dir, tmp_path):
    engine, run_dir = trained
    out = tmp_path / "features.npz"
    assert main(["embed", "--checkpoint", str(run_dir / BACKBONE_FILE), "--data",
                 str(synthetic_dir), "--out", str(out), "--split", "test",
                 "--max-images", "20", "--blocks", "2"]) == 0
    with np.load(out) as z:
        feats, labels, keys = z["features"], z["labels"], z["keys"]
    assert feats.shape == (20, 2 * engine.teacher.backbone.embed_dim) and len(set(keys)) == 20
    # the same numbers as the backbone's own [CLS] features of those images
    backbone, _ = load_teacher(run_dir / "state.pt")
    again = embed_dataset(run_dir / "state.pt", synthetic_dir, tmp_path / "again.npz",
                          split="test", n_last_blocks=2, limit=20)
    with np.load(again) as z:
        np.testing.assert_allclose(z["features"], feats, rtol=1e-5, atol=1e-5)
        assert list(z["keys"]) == list(keys)
    assert not list(tmp_path.glob(".*partial"))
