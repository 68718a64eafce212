import pytest

from attmask.config import PRESET_DIR, Config, load_config
from attmask.errors import ConfigError


def test_presets_load_and_validate():
    names = sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))
    assert {"tiny-cpu", "vit-tiny-224", "paper-20pct-in1k"} <= set(names)
    for name in names:
        assert isinstance(load_config(name), Config)


def test_paper_preset_matches_readme_recipe():
    cfg = load_config("paper-20pct-in1k")
    assert cfg.model.dims == (384, 12, 6) and cfg.model.patch_size == 16
    assert cfg.model.out_dim == 8192 and cfg.model.shared_head and not cfg.model.norm_last_layer
    assert cfg.optim.momentum_teacher == 0.99 and cfg.loss.teacher_temp == 0.07
    assert cfg.data.local_crops_number == 6 and cfg.masking.ratio == [0.1, 0.5]
    assert cfg.train.batch_size_per_worker * cfg.ray.num_workers == 240


def test_overrides_parse_yaml_values():
    cfg = load_config("tiny-cpu", overrides=["masking.ratio=[0.2,0.4]", "train.epochs=3",
                                             "masking.strategy=attmask_hint",
                                             "masking.options.attmask_hint.num_hints=2"])
    assert cfg.masking.ratio == [0.2, 0.4] and cfg.train.epochs == 3
    assert cfg.masking.masker_kwargs()["num_hints"] == 2


@pytest.mark.parametrize("override, field", [
    ("masking.strategy=nope", "masking.strategy"),
    ("masking.ratio=[0.5,0.1]", "masking.ratio"),
    ("masking.prob=1.5", "masking.prob"),
    ("masking.layer=6", "masking.layer"),
    ("masking.head_reduce=median", "masking.head_reduce"),
    ("model.image_size=30", "model.image_size"),
    ("model.arch=resnet", "model.arch"),
    ("train.epochs=x", "train.epochs"),
    ("train.precision=fp8", "train.precision"),
    ("model.typo=1", "model.typo"),
    ("bogus.key=1", "bogus"),
    ("loss.patch_center_sample=0", "loss.patch_center_sample"),
])
def test_invalid_values_name_the_field(override, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        load_config("tiny-cpu", overrides=[override])


def test_bad_override_syntax_and_files(tmp_path):
    with pytest.raises(ConfigError, match="key=value"):
        load_config(overrides=["train.epochs"])
    with pytest.raises(ConfigError, match="not found"):
        load_config(preset="nope")
    with pytest.raises(ConfigError, match="not found"):
        load_config(path=tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(path=bad)


def test_config_round_trips_through_yaml(tmp_path):
    cfg = load_config("tiny-cpu", overrides=["masking.layer=-2"])
    path = tmp_path / "c.yaml"
    path.write_text(cfg.to_yaml())
    assert load_config(path=path) == cfg
    assert cfg.flat()["masking.layer"] == -2


def test_exponent_without_a_dot_is_a_number():
    # YAML 1.1 parses 6e-3 as a string; a user typing optim.lr=6e-3 means the number
    assert load_config(overrides=["optim.lr=6e-3"]).optim.lr == 0.006
    with pytest.raises(ConfigError, match="optim.lr='fast': expected a number"):
        load_config(overrides=["optim.lr=fast"])
