"""Every bad input, one rule: exit status 2, exactly one ``error:`` line that names the offending
field or path, no traceback, and no change to anything that existed before the command.

Cases are ``(argv, words)``: ``argv`` may use ``{placeholders}`` for the files the ``world``
fixture writes (a valid dataset, checkpoints, and one broken file of each kind); ``words`` must
all appear in the error line. Every case fails before Ray, MLflow or training starts.
"""
import hashlib
import json
import os
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import save_file

from conftest import tiny_yaml
from run_pipeline import main


def write_yaml(path: Path, data) -> str:
    path.write_text(yaml.safe_dump(data))
    return str(path)


def write_npz(path: Path, **arrays) -> str:
    np.savez(path, **arrays)
    return str(path)


@pytest.fixture(scope="session")
def world(tmp_path_factory, synthetic_dir, tiny_checkpoint):
    """A valid dataset and checkpoint, and one broken file of every kind a user could pass."""
    root = tmp_path_factory.mktemp("bad-inputs")
    p: dict[str, str] = {"data": str(synthetic_dir), "ckpt": str(tiny_checkpoint),
                         "root": str(root)}

    # Config files.
    p["cfg_ok"] = str(tiny_yaml(root / "ok.yaml", f"data.path={synthetic_dir}"))
    (root / "malformed.yaml").write_text("model: {arch: vit_tiny\n  depth: [\n")
    (root / "latin1.yaml").write_bytes("model:\n  arch: vit_t\xefny\n".encode("latin-1"))
    (root / "list.yaml").write_text("- model\n- train\n")
    (root / "mixed.yaml").write_text("model:\n  1: vit_tiny\n")
    (root / "section_list.yaml").write_text("model: [1, 2]\n")
    (root / "unknown_section.yaml").write_text("modle:\n  arch: vit_tiny\n")
    (root / "unknown_field.yaml").write_text("model:\n  archh: vit_tiny\n")
    (root / "bad_type.yaml").write_text("train:\n  epochs: many\n")
    (root / "scalar.yaml").write_text("42\n")
    for name in ("malformed", "latin1", "list", "mixed", "section_list", "unknown_section",
                 "unknown_field", "bad_type", "scalar"):
        p[f"cfg_{name}"] = str(root / f"{name}.yaml")
    (root / "a_dir.yaml").mkdir()
    p["cfg_dir"] = str(root / "a_dir.yaml")

    # Datasets: broken manifests and shards next to the valid one.
    manifest = json.loads((synthetic_dir / "dataset.json").read_text())

    def dataset(name: str, edit=None, raw: str | None = None) -> str:
        d = root / name
        shutil.copytree(synthetic_dir, d)
        if raw is not None:
            (d / "dataset.json").write_text(raw)
        elif edit is not None:
            m = json.loads(json.dumps(manifest))
            edit(m)
            (d / "dataset.json").write_text(json.dumps(m))
        return str(d)

    p["ds_notjson"] = dataset("ds_notjson", raw="{not json")
    p["ds_list"] = dataset("ds_list", raw="[1, 2]")
    p["ds_nofile"] = dataset("ds_nofile", lambda m: m["splits"]["train"]["shards"][0].pop("file"))
    p["ds_size"] = dataset("ds_size", lambda m: m.update(image_size="big"))
    p["ds_nosplits"] = dataset("ds_nosplits", lambda m: m.pop("splits"))
    p["ds_noclasses"] = dataset("ds_noclasses", lambda m: m.pop("classes"))
    p["ds_notrain"] = dataset("ds_notrain", lambda m: m["splits"].pop("train"))
    p["ds_small"] = dataset("ds_small", lambda m: m.update(image_size=16))
    first = manifest["splits"]["train"]["shards"][0]["file"]
    p["shard"] = first
    d = Path(dataset("ds_missing_shard"))
    (d / first).unlink()
    p["ds_missing_shard"] = str(d)
    d = Path(dataset("ds_truncated"))
    (d / first).write_bytes((d / first).read_bytes()[:700])
    p["ds_truncated"] = str(d)
    d = Path(dataset("ds_checksum"))
    with open(d / first, "ab") as f:
        f.write(b"\0" * 1024)
    p["ds_checksum"] = str(d)
    (root / "no_manifest").mkdir()
    p["no_manifest"] = str(root / "no_manifest")

    # Checkpoints.
    (root / "text.pt").write_text("not a checkpoint\n")
    torch.save(torch.zeros(3), root / "tensor.pt")
    torch.save({"teacher": {}, "step": 1}, root / "noconfig.pt")

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    torch.save(Evil(), root / "evil.pt")  # unpickling it would run os.system
    with open(root / "evil_proto4.pt", "wb") as f:
        pickle.dump(Evil(), f, protocol=4)
    state = torch.load(tiny_checkpoint, weights_only=True)
    state["config"] = state["config"].replace("depth: 2", "depth: 3")
    torch.save(state, root / "wrongarch.pt")
    (root / "empty_dir").mkdir()
    save_file({"w": torch.zeros(2)}, str(root / "b.safetensors"))
    (root / "garbage.safetensors").write_bytes(b"\x00" * 64)
    for name in ("text.pt", "tensor.pt", "noconfig.pt", "evil.pt", "evil_proto4.pt",
                 "wrongarch.pt", "empty_dir",
                 "b.safetensors", "garbage.safetensors"):
        p[name.replace(".", "_")] = str(root / name)

    # Robustness sets and npz sources.
    img = np.zeros((4, 32, 32, 3), np.uint8)
    labels = np.array([0, 1, 2, 3])

    def rob(name: str, train=None, test=None, train_raw: bytes | None = None) -> str:
        d = root / name
        d.mkdir()
        if train_raw is not None:
            (d / "train_original.npz").write_bytes(train_raw)
        elif train is not None:
            write_npz(d / "train_original.npz", **train)
        if test is not None:
            write_npz(d / "test_mixed_rand.npz", **test)
        return str(d)

    ok = {"images": img, "labels": labels}
    p["rob_empty"] = rob("rob_empty")
    p["rob_trainonly"] = rob("rob_trainonly", ok)
    p["rob_nolabels"] = rob("rob_nolabels", {"images": img}, ok)
    p["rob_grey"] = rob("rob_grey", {"images": img[..., 0], "labels": labels}, ok)
    p["rob_range"] = rob("rob_range", {"images": img, "labels": np.array([0, 1, 2, 30])}, ok)
    p["rob_corrupt"] = rob("rob_corrupt", train_raw=b"PK\x03\x04 broken", test=ok)
    p["rob_float"] = rob("rob_float", {"images": img.astype(np.float32), "labels": labels}, ok)
    p["rob_testbad"] = rob("rob_testbad", ok, {"images": img})
    (root / "src_corrupt").mkdir()
    (root / "src_corrupt" / "train.npz").write_bytes(b"PK\x03\x04 broken")
    p["src_corrupt"] = str(root / "src_corrupt")
    (root / "src_object").mkdir()
    np.savez(root / "src_object" / "train.npz", images=np.array([None, 1], dtype=object),
             labels=np.array([0, 1]))
    p["src_object"] = str(root / "src_object")
    (root / "src_nolabels").mkdir()
    write_npz(root / "src_nolabels" / "train.npz", images=img)
    p["src_nolabels"] = str(root / "src_nolabels")
    (root / "src_negative").mkdir()
    write_npz(root / "src_negative" / "train.npz", images=img, labels=np.array([0, -1, 2, 3]))
    p["src_negative"] = str(root / "src_negative")
    (root / "src_empty").mkdir()
    p["src_empty"] = str(root / "src_empty")
    (root / "a_file").write_text("x")
    p["a_file"] = str(root / "a_file")

    # Search files (tune) and benchmark files.
    base = {"base": p["cfg_ok"], "space": {"masking.prob": {"uniform": [0.3, 0.7]}},
            "metric": "knn_top1", "mode": "max"}

    def search(name: str, **changes) -> str:
        data = {**base, **changes}
        for k in [k for k, v in changes.items() if v is None]:
            data.pop(k)
        return write_yaml(root / f"search_{name}.yaml", data)

    space = lambda key, sampler: {key: sampler}  # noqa: E731
    p.update({
        "s_ok": search("ok"),
        "s_nobase": search("nobase", base=None),
        "s_nospace": search("nospace", space=None),
        "s_emptyspace": search("emptyspace", space={}),
        "s_unknown": search("unknown", bogus=1),
        "s_sampler": search("sampler", space=space("masking.prob", {"normal": [0, 1]})),
        "s_twosamplers": search("twosamplers", space=space("masking.prob",
                                                           {"uniform": [0, 1], "choice": [1]})),
        "s_notkey": search("notkey", space=space("masking.bogus", {"choice": [1, 2]})),
        "s_nosection": search("nosection", space=space("prob", {"choice": [1, 2]})),
        "s_int_uniform": search("int_uniform", space=space("train.batch_size_per_worker",
                                                           {"uniform": [8, 64]})),
        "s_q0": search("q0", space=space("masking.prob", {"quniform": [0.1, 0.9, 0]})),
        "s_range": search("range", space=space("masking.prob", {"uniform": [0.7, 0.3]})),
        "s_log0": search("log0", space=space("optim.lr", {"loguniform": [0, 1e-3]})),
        "s_randint": search("randint", space=space("train.epochs", {"randint": [1.5, 4]})),
        "s_choice_empty": search("choice_empty", space=space("masking.strategy", {"choice": []})),
        "s_choice_bad": search("choice_bad", space=space("masking.strategy", {"choice": ["x"]})),
        "s_value_bad": search("value_bad", space=space("masking.prob", {"uniform": [0.5, 3.0]})),
        "s_metric": search("metric", metric="accuracy"),
        "s_metric_knn_off": search("metric_knn_off", overrides={"train.knn_every_epochs": 0}),
        "s_mode": search("mode", mode="maximise"),
        "s_samples": search("samples", num_samples=0),
        "s_concurrent": search("concurrent", max_concurrent=0),
        "s_search": search("search", search="bayes"),
        "s_grid_uniform": search("grid_uniform", search="grid"),
        "s_sched_type": search("sched_type", scheduler={"type": "pbt"}),
        "s_sched_key": search("sched_key", scheduler={"patience": 2}),
        "s_sched_grace": search("sched_grace", scheduler={"grace_period": 5, "max_t": 2}),
        "s_sched_maxt": search("sched_maxt", scheduler={"max_t": 10_000}),
        "s_workers0": search("workers0", resources_per_trial={"workers": 0}),
        "s_cpus_neg": search("cpus_neg", resources_per_trial={"cpus_per_worker": -1}),
        "s_gpus_neg": search("gpus_neg", resources_per_trial={"gpus_per_worker": -1}),
        "s_res_key": search("res_key", resources_per_trial={"memory": 4}),
        "s_base_missing": search("base_missing", base="nope/none.yaml"),
        "s_base_preset": search("base_preset", base="no-such-preset"),
        "s_override": search("override", overrides={"train.epochs": 0}),
        "s_override_key": search("override_key", overrides={"train.bogus": 1}),
    })
    (root / "search_list.yaml").write_text("- base\n")
    p["s_list"] = str(root / "search_list.yaml")
    (root / "search_malformed.yaml").write_text("space: {a: [\n")
    p["s_malformed"] = str(root / "search_malformed.yaml")

    bench = {"description": "x", "data": {"path": str(synthetic_dir)}, "preset": p["cfg_ok"],
             "strategies": ["random"], "seeds": [0], "evaluation": {"suite": ["knn"]}}

    def benchmark(name: str, **changes) -> str:
        return write_yaml(root / f"bench_{name}.yaml", {**bench, **changes})

    p.update({
        "b_unknown": benchmark("unknown", bogus=1),
        "b_nodata": benchmark("nodata", data={}),
        "b_source": benchmark("source", data={"source": "imagenet21k", "out": str(root / "o")}),
        "b_from": benchmark("from", data={"source": "npz", "out": str(root / "o"),
                                          "from": "/nonexistent/npz"}),
        "b_nsamples": benchmark("nsamples", data={"source": "synthetic", "out": str(root / "o"),
                                                  "num_samples": -5}),
        "b_datakey": benchmark("datakey", data={"path": str(synthetic_dir), "bogus": 1}),
        "b_strategy": benchmark("strategy", strategies=["random", "attmask_mid"]),
        "b_seeds": benchmark("seeds", seeds=["zero"]),
        "b_seeds_twice": benchmark("seeds_twice", seeds=[0, 1, 0]),
        "b_suite": benchmark("suite", evaluation={"suite": ["knn", "segmentation"]}),
        "b_probe": benchmark("probe", evaluation={"probe_epochs": -3}),
        "b_maxtrain": benchmark("maxtrain", evaluation={"max_train": 0}),
        "b_maxatt": benchmark("maxatt", evaluation={"max_attention": "all"}),
        "b_evalkey": benchmark("evalkey", evaluation={"shots": [1]}),
        "b_override": benchmark("override", overrides={"masking.strategy": "random"}),
        "b_override_bad": benchmark("override_bad", overrides={"train.epochs": 0}),
        "b_preset": benchmark("preset", preset="no-such-preset"),
    })
    (root / "bench_malformed.yaml").write_text("data: {path: [\n")
    p["b_malformed"] = str(root / "bench_malformed.yaml")

    # Report folders a benchmark must not write into, and cluster files check-cluster refuses.
    other = root / "reports_other" / "default"
    other.mkdir(parents=True)
    (other / "benchmark.json").write_text('{"name": "default", "digest": "deadbeef"}')
    (other / "report.md").write_text("another benchmark's report")
    p["reports_other"] = str(root / "reports_other")
    torn = root / "reports_torn" / "default" / "runs" / "random-s0"
    torn.mkdir(parents=True)
    (torn / "record.json").write_text('{"run_name": ')
    p["reports_torn"] = str(root / "reports_torn")
    cluster = yaml.safe_load((Path(__file__).resolve().parent.parent / "cluster.yaml").read_text())

    def cluster_file(name: str, mutate) -> str:
        data = json.loads(json.dumps(cluster))
        mutate(data)
        return write_yaml(root / f"cluster_{name}.yaml", data)

    p["cl_wrapped"] = cluster_file("wrapped", lambda c: c["head_start_ray_commands"].append(
        "bash -c 'mlflow server --app-name basic-auth --host 0.0.0.0'"))
    p["cl_ui"] = cluster_file("ui", lambda c: c["head_start_ray_commands"].append(
        "mlflow ui --host 0.0.0.0 --port 5000"))
    p["cl_uri"] = cluster_file("uri", lambda c: c["setup_commands"].append(
        "export MLFLOW_TRACKING_URI=https://admin:pa55word@10.0.0.2:5000"))
    p["cl_provider"] = cluster_file("provider", lambda c: c["provider"].update(
        aws_secret_access_key="wJalrXUtnFEMI"))
    p["cl_env"] = cluster_file("env", lambda c: c["available_node_types"][c["head_node_type"]]
                               .setdefault("node_config", {}).update(
                                   Environment={"MLFLOW_TRACKING_TOKEN": "tok"}))

    # An image folder with no images, and an existing output the failed commands must keep.
    (root / "imgs_empty" / "train" / "cat").mkdir(parents=True)
    p["imgs_empty"] = str(root / "imgs_empty")
    (root / "existing_eval").mkdir()
    (root / "existing_eval" / "results.json").write_text('{"keep": true}')
    p["existing_eval"] = str(root / "existing_eval")
    return p


def snapshot(*roots: str) -> dict[str, str]:
    out = {}
    for r in roots:
        for path in sorted(Path(r).rglob("*")):
            out[str(path)] = (hashlib.sha256(path.read_bytes()).hexdigest()
                              if path.is_file() else "dir")
    return out


TRAIN = ["pretrain-local", "--config", "{cfg_ok}"]
EVAL = ["evaluate", "--checkpoint", "{ckpt}", "--data", "{data}", "--out", "{existing_eval}"]
EMBED = ["embed", "--checkpoint", "{ckpt}", "--data", "{data}", "--out", "{root}/e.npz"]
PREP = ["prepare-data", "--out", "{root}/prep_out"]
GOOD_PREP = PREP + ["--source", "synthetic", "--num-samples", "40", "--num-test-samples", "8"]

CASES = [
    # -- config values (overrides) ------------------------------------------------------------
    (TRAIN + ["model.arch=vit_huge"], ["model.arch", "vit_tiny"]),
    (TRAIN + ["model.depth=0"], ["model.depth"]),
    (TRAIN + ["model.depth=many"], ["model.depth"]),
    (TRAIN + ["model.depth=100"], ["model.depth"]),
    (TRAIN + ["train.checkpoint_blocks=3"], ["train.checkpoint_blocks", "2"]),  # tiny: 2 blocks
    (TRAIN + ["train.checkpoint_blocks=-1"], ["train.checkpoint_blocks"]),
    (TRAIN + ["train.compile=maybe"], ["train.compile"]),
    (TRAIN + ["model.image_size=0"], ["model.image_size"]),
    (TRAIN + ["model.image_size=30"], ["model.image_size"]),
    (TRAIN + ["model.local_image_size=6"], ["model.local_image_size"]),
    (TRAIN + ["model.patch_size=0"], ["model.patch_size"]),
    (TRAIN + ["model.stem=conv"], ["model.stem", "hmlp"]),
    (TRAIN + ["model.stem=hmlp", "model.patch_size=1", "model.image_size=32",
              "model.local_image_size=16"], ["model.stem=hmlp", "even"]),
    (TRAIN + ["model.drop_path=1.5"], ["model.drop_path"]),
    (TRAIN + ["model.drop_path=-0.1"], ["model.drop_path"]),
    (TRAIN + ["model.out_dim=0"], ["model.out_dim"]),
    (TRAIN + ["model.head_hidden_dim=-1"], ["model.head_hidden_dim"]),
    (TRAIN + ["model.head_layers=0"], ["model.head_layers"]),
    (TRAIN + ["model.head_bn=maybe"], ["model.head_bn"]),
    (TRAIN + ["masking.strategy=attmask_mid"], ["masking.strategy", "attmask_high"]),
    (TRAIN + ["masking.ratio=[0.6,0.2]"], ["masking.ratio"]),
    (TRAIN + ["masking.ratio=[-0.1,0.5]"], ["masking.ratio"]),
    (TRAIN + ["masking.ratio=[0.1,0.2,0.3]"], ["masking.ratio"]),
    (TRAIN + ["masking.ratio=half"], ["masking.ratio"]),
    (TRAIN + ["masking.prob=2"], ["masking.prob"]),
    (TRAIN + ["masking.prob=-1"], ["masking.prob"]),
    (TRAIN + ["masking.options.attmask_hint.show_max=1.5"],
     ["masking.options.attmask_hint.show_max"]),
    (TRAIN + ["masking.options.attmask_hint.num_hints=-2"],
     ["masking.options.attmask_hint.num_hints"]),
    (TRAIN + ["masking.options.random.num_hints=2"], ["masking.options.random.num_hints"]),
    (TRAIN + ["masking.options.blocky.aspect=0.5"], ["masking.options.blocky", "block"]),
    (TRAIN + ["masking.options.block.aspect=0"], ["masking.options.block.aspect"]),
    (TRAIN + ["masking.show_max=0.1"], ["masking.show_max"]),
    (TRAIN + ["masking.layer=99"], ["masking.layer"]),
    (TRAIN + ["masking.head_reduce=median"], ["masking.head_reduce"]),
    (TRAIN + ["masking.ratio_per=pixel"], ["masking.ratio_per"]),
    (TRAIN + ["loss.framework=mae"], ["loss.framework"]),
    (TRAIN + ["loss.teacher_temp=0"], ["loss.teacher_temp"]),
    (TRAIN + ["loss.teacher_temp=-1"], ["loss.teacher_temp"]),
    (TRAIN + ["loss.student_temp=0"], ["loss.student_temp"]),
    (TRAIN + ["loss.warmup_teacher_temp_epochs=-1"], ["loss.warmup_teacher_temp_epochs"]),
    (TRAIN + ["loss.center_momentum=1.5"], ["loss.center_momentum"]),
    (TRAIN + ["loss.centering=kmeans"], ["loss.centering", "sinkhorn"]),
    (TRAIN + ["data.color_jitter=[0.4,0.4,0.2]"], ["data.color_jitter", "hue"]),
    (TRAIN + ["data.color_jitter=[0.4,0.4,0.2,0.9]"], ["data.color_jitter"]),
    (TRAIN + ["data.grayscale_prob=2"], ["data.grayscale_prob"]),
    (TRAIN + ["loss.lambda1=-1"], ["loss.lambda1"]),
    (TRAIN + ["loss.patch_center_sample=0"], ["loss.patch_center_sample"]),
    (TRAIN + ["optim.lr=-1"], ["optim.lr"]),
    (TRAIN + ["optim.lr=fast"], ["optim.lr"]),
    (TRAIN + ["optim.lr_batch_reference=0"], ["optim.lr_batch_reference"]),
    (TRAIN + ["optim.weight_decay=-0.1"], ["optim.weight_decay"]),
    (TRAIN + ["optim.warmup_epochs=-1"], ["optim.warmup_epochs"]),
    (TRAIN + ["optim.momentum_teacher=1.5"], ["optim.momentum_teacher"]),
    (TRAIN + ["optim.clip_grad=-1"], ["optim.clip_grad"]),
    (TRAIN + ["optim.freeze_last_layer=-1"], ["optim.freeze_last_layer"]),
    (TRAIN + ["train.epochs=0"], ["train.epochs"]),
    (TRAIN + ["train.epochs=1.5"], ["train.epochs"]),
    (TRAIN + ["train.batch_size_per_worker=0"], ["train.batch_size_per_worker"]),
    (TRAIN + ["train.steps_per_epoch=0"], ["train.steps_per_epoch"]),
    (TRAIN + ["train.precision=fp8"], ["train.precision"]),
    (TRAIN + ["train.seed=abc"], ["train.seed"]),
    (TRAIN + ["train.log_every_steps=0"], ["train.log_every_steps"]),
    (TRAIN + ["train.checkpoint_every_steps=-1"], ["train.checkpoint_every_steps"]),
    (TRAIN + ["train.checkpoint_keep=0"], ["train.checkpoint_keep"]),
    (TRAIN + ["train.knn_train_samples=0"], ["train.knn_train_samples"]),
    (TRAIN + ["train.run_name=../../x"], ["train.run_name"]),
    (TRAIN + ["train.run_name=it's"], ["train.run_name"]),
    (TRAIN + ["train.run_name=" + "x" * 300], ["train.run_name"]),
    (TRAIN + ["train.run_name=a b"], ["train.run_name"]),
    (TRAIN + ["data.global_crops_scale=[0.9,0.1]"], ["data.global_crops_scale"]),
    (TRAIN + ["data.local_crops_scale=[0,0.2]"], ["data.local_crops_scale"]),
    (TRAIN + ["data.local_crops_number=-1"], ["data.local_crops_number"]),
    (TRAIN + ["data.num_workers=-1"], ["data.num_workers"]),
    (TRAIN + ["data.shuffle_buffer=-1"], ["data.shuffle_buffer"]),
    (TRAIN + ["data.max_corrupt_fraction=2"], ["data.max_corrupt_fraction"]),
    (TRAIN + ["data.split=validation"], ["validation"]),
    (TRAIN + ["tracking.timeout_s=0"], ["tracking.timeout_s"]),
    (TRAIN + ["tracking.log_images_every_epochs=-1"], ["tracking.log_images_every_epochs"]),
    (TRAIN + ["ray.num_workers=0"], ["ray.num_workers"]),
    (TRAIN + ["ray.cpus_per_worker=-1"], ["ray.cpus_per_worker"]),
    (TRAIN + ["ray.max_failures=-5"], ["ray.max_failures"]),
    # -- override syntax ----------------------------------------------------------------------
    (TRAIN + ["model.bogus=1"], ["model.bogus"]),
    (TRAIN + ["bogus.x=1"], ["bogus"]),
    (TRAIN + ["noequals"], ["noequals"]),
    (TRAIN + ["=1"], ["=1"]),
    (TRAIN + ["model=1"], ["model"]),
    (TRAIN + ["model.arch.x=1"], ["model.arch.x"]),
    (TRAIN + ["masking.ratio=[0.1,"], ["masking.ratio"]),
    # -- config files -------------------------------------------------------------------------
    (["pretrain-local", "--config", "{cfg_malformed}"], ["{cfg_malformed}", "YAML"]),
    (["pretrain-local", "--config", "{cfg_latin1}"], ["{cfg_latin1}"]),
    (["pretrain-local", "--config", "{cfg_list}"], ["{cfg_list}", "mapping"]),
    (["pretrain-local", "--config", "{cfg_scalar}"], ["{cfg_scalar}", "mapping"]),
    (["pretrain-local", "--config", "{cfg_mixed}"], ["model"]),
    (["pretrain-local", "--config", "{cfg_section_list}"], ["model"]),
    (["pretrain-local", "--config", "{cfg_unknown_section}"], ["modle"]),
    (["pretrain-local", "--config", "{cfg_unknown_field}"], ["model.archh"]),
    (["pretrain-local", "--config", "{cfg_bad_type}"], ["train.epochs"]),
    (["pretrain-local", "--config", "{cfg_dir}"], ["{cfg_dir}"]),
    (["pretrain-local", "--config", "{root}/none.yaml"], ["{root}/none.yaml"]),
    (["pretrain-local", "--preset", "nope"], ["nope", "tiny-cpu"]),
    (["pretrain-local", "--preset", "tiny-cpu", "--config", "{cfg_ok}"], ["--config"]),
    # -- flags ----------------------------------------------------------------------------------
    (TRAIN + ["--device", "foo"], ["--device", "foo"]),
    (TRAIN + ["--device", "cuda"], ["--device", "cuda"]),
    (TRAIN + ["--device", "cuda:7"], ["--device", "cuda:7"]),
    (TRAIN + ["--max-steps", "-1"], ["--max-steps"]),
    (TRAIN + ["--max-steps", "0"], ["--max-steps"]),
    (TRAIN + ["--max-steps", "ten"], ["--max-steps"]),
    (TRAIN + ["--inject-fault", "0"], ["--inject-fault", "STEP"]),
    (TRAIN + ["tracking.experiment=it's"], ["tracking.experiment"]),
    (["check-cluster", "/nonexistent/cluster.yaml"], ["/nonexistent/cluster.yaml", "cannot read"]),
    (TRAIN + ["--inject-fault", "3:boom"], ["--inject-fault", "KIND"]),
    (TRAIN + ["--inject-fault", "3:nan:x"], ["--inject-fault", "RANK"]),
    (["bench-step", "--steps", "-1"], ["--steps"]),
    (["bench-step", "--steps", "0"], ["--steps"]),
    (["bench-step", "--warmup", "-1"], ["--warmup"]),
    (["bench-step", "--threads", "-1"], ["--threads"]),
    (["bench-step", "--threads", "0"], ["--threads"]),
    (["bench-step", "--batch-size", "0"], ["--batch-size"]),
    (["bench-step", "--precision", "fp8"], ["--precision"]),
    (["bench-step", "--device", "foo"], ["--device", "foo"]),
    (["bench-step", "--strategies", "random,bogus"], ["bogus"]),
    (["bench-step", "--strategies", ","], ["--strategies"]),
    (["bench-data", "--data", "{data}", "--workers", "-1"], ["--workers"]),
    (["bench-data", "--data", "{data}", "--batches", "0"], ["--batches"]),
    (["bench-data", "--data", "{data}", "--batch-size", "0"], ["--batch-size"]),
    (["bench-data", "--data", "{root}/nothing"], ["{root}/nothing"]),
    (["no-such-command"], ["invalid choice"]),
    # -- evaluation options -------------------------------------------------------------------
    (EVAL + ["--probe-epochs", "0"], ["--probe-epochs"]),
    (EVAL + ["--finetune-epochs", "0"], ["--finetune-epochs"]),
    (EVAL + ["--max-train", "-1"], ["--max-train"]),
    (EVAL + ["--max-test", "0"], ["--max-test"]),
    (EVAL + ["--max-attention", "-1"], ["--max-attention"]),
    (EVAL + ["--suite", "knn,segmentation"], ["--suite", "segmentation"]),
    (EVAL + ["--suite", ","], ["--suite"]),
    (EVAL + ["--baselines", "imagenet"], ["--baselines", "imagenet"]),
    (["evaluate", "--data", "{data}"], ["--checkpoint", "--mlflow-run"]),
    (["evaluate", "--checkpoint", "{ckpt}"], ["--data"]),
    (["evaluate", "--checkpoint", "{ckpt}", "--data", "{root}/nothing"], ["{root}/nothing"]),
    (["evaluate", "--checkpoint", "{ckpt}", "--data", "{ds_small}"], ["{ds_small}", "px"]),
    (["evaluate", "--checkpoint", "{ckpt}", "--data", "{ds_notrain}"], ["train"]),
    (EVAL[:-2] + ["--out", "{a_file}"], ["--out", "{a_file}"]),
    (EVAL[:-2] + ["--out", "{a_file}/sub"], ["--out", "{a_file}/sub"]),
    # -- checkpoints ----------------------------------------------------------------------------
    (["evaluate", "--checkpoint", "{root}/none.pt", "--data", "{data}"], ["{root}/none.pt"]),
    (["evaluate", "--checkpoint", "{text_pt}", "--data", "{data}"], ["{text_pt}"]),
    (["evaluate", "--checkpoint", "{tensor_pt}", "--data", "{data}"], ["{tensor_pt}"]),
    (["evaluate", "--checkpoint", "{noconfig_pt}", "--data", "{data}"], ["{noconfig_pt}"]),
    (["evaluate", "--checkpoint", "{evil_pt}", "--data", "{data}"],
     ["{evil_pt}", "posix.system"]),
    (["evaluate", "--checkpoint", "{evil_proto4_pt}", "--data", "{data}"],
     ["{evil_proto4_pt}", "refused"]),
    (["evaluate", "--checkpoint", "{wrongarch_pt}", "--data", "{data}"], ["{wrongarch_pt}"]),
    (["evaluate", "--checkpoint", "{empty_dir}", "--data", "{data}"], ["{empty_dir}"]),
    (["evaluate", "--checkpoint", "{b_safetensors}", "--data", "{data}"],
     ["{b_safetensors}", "--config"]),
    (["evaluate", "--config", "{cfg_ok}", "--checkpoint", "{b_safetensors}", "--data", "{data}"],
     ["{b_safetensors}", "missing keys"]),
    (["evaluate", "--config", "{cfg_ok}", "--checkpoint", "{garbage_safetensors}", "--data",
      "{data}"], ["{garbage_safetensors}"]),
    # -- robustness sets ------------------------------------------------------------------------
    (EVAL + ["--robustness-set", "{root}/none"], ["{root}/none"]),
    (EVAL + ["--robustness-set", "{rob_empty}"], ["{rob_empty}", "neither"]),
    (EVAL + ["--robustness-set", "{rob_trainonly}"], ["{rob_trainonly}", "test_<variant>"]),
    (EVAL + ["--robustness-set", "{rob_nolabels}"], ["train_original.npz", "labels"]),
    (EVAL + ["--robustness-set", "{rob_grey}"], ["train_original.npz", "RGB"]),
    (EVAL + ["--robustness-set", "{rob_float}"], ["train_original.npz", "uint8"]),
    (EVAL + ["--robustness-set", "{rob_range}"], ["train_original.npz", "labels up to 30"]),
    (EVAL + ["--robustness-set", "{rob_corrupt}"], ["train_original.npz", "readable"]),
    (EVAL + ["--robustness-set", "{rob_testbad}"], ["test_mixed_rand.npz", "labels"]),
    # -- shards and manifests ---------------------------------------------------------------------
    (TRAIN + ["data.path={no_manifest}"], ["{no_manifest}/dataset.json"]),
    (TRAIN + ["data.path={ds_notjson}"], ["{ds_notjson}/dataset.json"]),
    (TRAIN + ["data.path={ds_list}"], ["{ds_list}/dataset.json"]),
    (TRAIN + ["data.path={ds_nofile}"], ["{ds_nofile}/dataset.json", "file"]),
    (TRAIN + ["data.path={ds_size}"], ["{ds_size}/dataset.json", "image_size"]),
    (TRAIN + ["data.path={ds_nosplits}"], ["{ds_nosplits}/dataset.json", "splits"]),
    (TRAIN + ["data.path={ds_noclasses}"], ["{ds_noclasses}/dataset.json", "classes"]),
    (TRAIN + ["data.path={ds_notrain}"], ["train"]),
    (TRAIN + ["data.path={ds_small}"], ["{ds_small}", "model.image_size"]),
    (TRAIN + ["data.path={ds_missing_shard}"], ["{shard}"]),
    (TRAIN + ["data.path={ds_truncated}"], ["{shard}"]),
    (TRAIN + ["data.path={ds_checksum}"], ["{shard}"]),
    (TRAIN + ["data.path={a_file}"], ["{a_file}"]),
    (["pretrain", "--config", "{cfg_ok}", "data.path={ds_checksum}"], ["{shard}"]),
    # -- data sources (prepare-data) ----------------------------------------------------------------
    (PREP + ["--source", "bogus"], ["--source", "synthetic"]),
    (PREP, ["--source"]),
    (["prepare-data", "--source", "synthetic"], ["--out"]),
    (PREP + ["--source", "npz"], ["--from"]),
    (PREP + ["--source", "imagefolder"], ["--from"]),
    (PREP + ["--source", "npz", "--from", "{root}/none"], ["{root}/none"]),
    (PREP + ["--source", "npz", "--from", "{src_corrupt}"], ["{src_corrupt}/train.npz"]),
    (PREP + ["--source", "npz", "--from", "{src_object}"], ["{src_object}/train.npz"]),
    (PREP + ["--source", "npz", "--from", "{src_nolabels}"], ["{src_nolabels}/train.npz",
                                                               "labels"]),
    (PREP + ["--source", "npz", "--from", "{src_negative}"], ["{src_negative}/train.npz"]),
    (PREP + ["--source", "npz", "--from", "{src_empty}"], ["{src_empty}"]),
    (PREP + ["--source", "imagefolder", "--from", "{imgs_empty}"], ["{imgs_empty}"]),
    (PREP + ["--source", "imagefolder", "--from", "{a_file}"], ["{a_file}"]),
    (PREP + ["--source", "synthetic", "--num-samples", "0"], ["--num-samples"]),
    (PREP + ["--source", "synthetic", "--num-samples", "-5"], ["--num-samples"]),
    (PREP + ["--source", "synthetic", "--num-test-samples", "-1"], ["--num-test-samples"]),
    (GOOD_PREP + ["--shard-size", "0"], ["--shard-size"]),
    (GOOD_PREP + ["--image-size", "0"], ["--image-size"]),
    (GOOD_PREP + ["--per-class", "0"], ["--per-class"]),
    (GOOD_PREP + ["--num-classes", "0"], ["num_classes"]),
    (GOOD_PREP + ["--num-classes", "50"], ["num_classes"]),
    (GOOD_PREP + ["--bg-correlation", "2"], ["bg_correlation"]),
    (GOOD_PREP + ["--colours", "grey"], ["--colours", "random, fixed"]),
    (PREP + ["--source", "cifar10", "--colours", "fixed"], ["--colours", "synthetic"]),
    (PREP + ["--source", "cifar10", "--num-variant-samples", "5"],
     ["--num-variant-samples", "synthetic"]),
    (GOOD_PREP + ["--num-variant-samples", "0"], ["--num-variant-samples"]),
    (["prepare-data", "--source", "synthetic", "--out", "{a_file}"], ["--out", "{a_file}"]),
    (["prepare-data", "--source", "synthetic", "--out", "{a_file}/sub"], ["{a_file}"]),
    (["prepare-data", "--source", "synthetic", "--out", "/proc/attmask-data"],
     ["/proc/attmask-data"]),
    # -- search files (tune --dry-run) --------------------------------------------------------------
    (["tune", "{root}/none.yaml", "--dry-run"], ["{root}/none.yaml"]),
    (["tune", "{s_list}", "--dry-run"], ["{s_list}", "mapping"]),
    (["tune", "{s_malformed}", "--dry-run"], ["{s_malformed}", "YAML"]),
    (["tune", "{s_nobase}", "--dry-run"], ["base"]),
    (["tune", "{s_nospace}", "--dry-run"], ["space"]),
    (["tune", "{s_emptyspace}", "--dry-run"], ["space"]),
    (["tune", "{s_unknown}", "--dry-run"], ["bogus"]),
    (["tune", "{s_sampler}", "--dry-run"], ["normal"]),
    (["tune", "{s_twosamplers}", "--dry-run"], ["masking.prob"]),
    (["tune", "{s_notkey}", "--dry-run"], ["masking.bogus"]),
    (["tune", "{s_nosection}", "--dry-run"], ["prob"]),
    (["tune", "{s_int_uniform}", "--dry-run"], ["train.batch_size_per_worker", "randint"]),
    (["tune", "{s_q0}", "--dry-run"], ["quniform", "q > 0"]),
    (["tune", "{s_range}", "--dry-run"], ["masking.prob", "range"]),
    (["tune", "{s_log0}", "--dry-run"], ["optim.lr", "loguniform"]),
    (["tune", "{s_randint}", "--dry-run"], ["train.epochs", "randint"]),
    (["tune", "{s_choice_empty}", "--dry-run"], ["masking.strategy", "choice"]),
    (["tune", "{s_choice_bad}", "--dry-run"], ["masking.strategy"]),
    (["tune", "{s_value_bad}", "--dry-run"], ["masking.prob", "3.0"]),
    (["tune", "{s_metric}", "--dry-run"], ["metric", "accuracy", "knn_top1"]),
    (["tune", "{s_metric_knn_off}", "--dry-run"], ["metric", "knn_top1"]),
    (["tune", "{s_mode}", "--dry-run"], ["mode", "maximise"]),
    (["tune", "{s_samples}", "--dry-run"], ["num_samples"]),
    (["tune", "{s_concurrent}", "--dry-run"], ["max_concurrent"]),
    (["tune", "{s_search}", "--dry-run"], ["search", "bayes"]),
    (["tune", "{s_grid_uniform}", "--dry-run"], ["grid", "uniform"]),
    (["tune", "{s_sched_type}", "--dry-run"], ["scheduler.type", "pbt"]),
    (["tune", "{s_sched_key}", "--dry-run"], ["scheduler.patience"]),
    (["tune", "{s_sched_grace}", "--dry-run"], ["grace_period"]),
    (["tune", "{s_sched_maxt}", "--dry-run"], ["max_t"]),
    (["tune", "{s_workers0}", "--dry-run"], ["resources_per_trial.workers"]),
    (["tune", "{s_cpus_neg}", "--dry-run"], ["resources_per_trial.cpus_per_worker"]),
    (["tune", "{s_gpus_neg}", "--dry-run"], ["resources_per_trial.gpus_per_worker"]),
    (["tune", "{s_res_key}", "--dry-run"], ["resources_per_trial.memory"]),
    (["tune", "{s_base_missing}", "--dry-run"], ["nope/none.yaml"]),
    (["tune", "{s_base_preset}", "--dry-run"], ["no-such-preset"]),
    (["tune", "{s_override}", "--dry-run"], ["train.epochs"]),
    (["tune", "{s_override_key}", "--dry-run"], ["train.bogus"]),
    (["tune", "{s_ok}", "--dry-run", "train.epochs=0"], ["train.epochs"]),
    (["tune", "{s_ok}", "--dry-run", "noequals"], ["noequals"]),
    (["tune", "{s_ok}", "train.epochs=0"], ["train.epochs"]),
    # -- benchmark files -------------------------------------------------------------------------
    (["benchmark", "--preset", "nope", "--dry-run"], ["nope", "default"]),
    (["benchmark", "--preset", "{root}/none.yaml", "--dry-run"], ["{root}/none.yaml"]),
    (["benchmark", "--preset", "{b_malformed}", "--dry-run"], ["{b_malformed}"]),
    (["benchmark", "--preset", "{b_unknown}", "--dry-run"], ["bogus"]),
    (["benchmark", "--preset", "{b_nodata}", "--dry-run"], ["data"]),
    (["benchmark", "--preset", "{b_source}", "--dry-run"], ["imagenet21k", "synthetic"]),
    (["benchmark", "--preset", "{b_from}", "--dry-run"], ["/nonexistent/npz"]),
    (["benchmark", "--preset", "{b_nsamples}", "--dry-run"], ["num-samples"]),
    (["benchmark", "--preset", "{b_datakey}", "--dry-run"], ["data.bogus"]),
    (["benchmark", "--preset", "{b_strategy}", "--dry-run"], ["attmask_mid"]),
    (["benchmark", "--preset", "{b_seeds}", "--dry-run"], ["seeds"]),
    (["benchmark", "--preset", "{b_seeds_twice}", "--dry-run"], ["seeds", "distinct"]),
    (["benchmark", "--preset", "{b_suite}", "--dry-run"], ["segmentation"]),
    (["benchmark", "--preset", "{b_probe}", "--dry-run"], ["probe_epochs"]),
    (["benchmark", "--preset", "{b_maxtrain}", "--dry-run"], ["max_train"]),
    (["benchmark", "--preset", "{b_maxatt}", "--dry-run"], ["max_attention"]),
    (["benchmark", "--preset", "{b_evalkey}", "--dry-run"], ["evaluation.shots"]),
    (["benchmark", "--preset", "{b_override}", "--dry-run"], ["masking.strategy"]),
    (["benchmark", "--preset", "{b_override_bad}", "--dry-run"], ["train.epochs"]),
    (["benchmark", "--preset", "{b_preset}", "--dry-run"], ["no-such-preset"]),
    (["benchmark", "--preset", "{b_unknown}"], ["bogus"]),
    (["benchmark", "--dry-run", "train.seed=3"], ["train.seed"]),
    (["benchmark", "--dry-run", "train.run_name=x"], ["train.run_name"]),
    (["benchmark", "--dry-run", "train.epochs=0"], ["train.epochs"]),
    (["benchmark", "--dry-run", "--seeds", "3-1"], ["--seeds", "3-1"]),
    (["benchmark", "--dry-run", "--seeds", "0,1,0"], ["--seeds", "each once"]),
    (["benchmark", "--dry-run", "--seeds", "zero"], ["--seeds", "0-12"]),
    (["benchmark", "--dry-run", "--strategies", "random,attmask_mid"],
     ["--strategies", "attmask_mid", "attmask_high"]),
    (["benchmark", "--dry-run", "--strategies", "random,random"], ["--strategies", "once"]),
    # -- added with the val split, the report-folder identity and the trust review -------------
    (GOOD_PREP + ["--val-fraction", "1.5"], ["--val-fraction", "[0, 1)"]),
    (GOOD_PREP + ["--val-fraction", "-0.1"], ["--val-fraction"]),
    (GOOD_PREP + ["--val-fraction", "lots"], ["--val-fraction"]),
    (GOOD_PREP + ["--val-per-class", "0"], ["--val-per-class"]),
    (GOOD_PREP + ["--val-fraction", "0.1", "--val-per-class", "3"],
     ["--val-per-class", "--val-fraction"]),
    (GOOD_PREP + ["--seed", "-1"], ["--seed", "2^63"]),
    (TRAIN + ["train.seed=-1"], ["train.seed"]),
    (TRAIN + ["train.seed=99999999999999999999999"], ["train.seed"]),
    (TRAIN + ["train.knn_split=train"], ["train.knn_split=train", "val"]),
    (TRAIN + ["masking.strategy=attmask_hint", "model.patch_size=8"],
     ["masking.strategy=attmask_hint", "4 x 4", "5 x 5"]),
    (TRAIN + ["masking.ratio_per=sometimes"], ["masking.ratio_per"]),
    (TRAIN + ["masking.head_reduce=median"], ["masking.head_reduce"]),
    (TRAIN + ["masking.layer=7"], ["masking.layer"]),
    (TRAIN + ["masking.options.block.aspect=0"], ["masking.options.block.aspect"]),
    (TRAIN + ["masking.options.attmask_hint.num_hints=-1"],
     ["masking.options.attmask_hint.num_hints"]),
    (TRAIN + ["masking.options.random.show_max=0.1"], ["masking.options.random.show_max"]),
    (TRAIN + ["masking.options.nosuch.x=1"], ["masking.options.nosuch"]),
    (TRAIN + ["data.colour_on=gpu"], ["data.colour_on"]),
    (TRAIN + ["train.output_dir={a_file}"], ["train.output_dir", "{a_file}"]),
    (TRAIN + ["train.output_dir={a_file}/runs"], ["train.output_dir", "{a_file}"]),
    (["pretrain", "--config", "{cfg_ok}", "train.output_dir={a_file}"], ["train.output_dir"]),
    (["pretrain", "--config", "{cfg_ok}", "--inject-fault", "2:exit:3"],
     ["--inject-fault", "rank 3", "ray.num_workers"]),
    (["benchmark", "--dry-run", "--seeds", "0-"], ["--seeds", "0-"]),
    (["benchmark", "--dry-run", "--seeds", "-"], ["--seeds"]),
    (["benchmark", "--dry-run", "--strategies="], ["--strategies"]),
    (["benchmark", "--dry-run", "--strategies", "random,"], ["--strategies"]),
    (["benchmark", "--dry-run", "--reports", "{a_file}"], ["--reports", "not a directory"]),
    (["benchmark", "--dry-run", "--reports", "{reports_other}"],
     ["--reports", "deadbeef", "another --reports folder"]),
    (["benchmark", "--reports", "{reports_other}"], ["deadbeef"]),
    (["benchmark", "--dry-run", "--reports", "{reports_torn}"],
     ["{reports_torn}/default/runs/random-s0/record.json", "unreadable run record"]),
    (["benchmark", "--dry-run", "data.path={root}/no_such_data"], ["{root}/no_such_data",
                                                                   "manifest"]),
    (["device-check", "--quick", "--json", "{root}"], ["--json", "is a directory"]),
    (["device-check", "--quick", "--json", "{a_file}/figures.json"], ["--json", "{a_file}"]),
    (["bench-step", "--json", "{root}"], ["--json", "is a directory"]),
    (["bench-data", "--data", "{data}", "--json", "{root}"], ["--json"]),
    (["check-cluster", "{cl_wrapped}"], ["head_start_ray_commands", "--host 0.0.0.0"]),
    (["check-cluster", "{cl_ui}"], ["mlflow ui --host 0.0.0.0"]),
    (["check-cluster", "{cl_uri}"], ["setup_commands", "password"]),
    (["check-cluster", "{cl_provider}"], ["provider.aws_secret_access_key"]),
    (["check-cluster", "{cl_env}"], ["Environment.MLFLOW_TRACKING_TOKEN"]),
    (EVAL + ["--linear-protocol", "paper"], ["--linear-protocol", "official"]),
    (["benchmark", "--dry-run", "--max-seeds", "6"], ["max_seeds=6", "--resolve"]),
    (["benchmark", "--dry-run", "--resolve", "0"], ["resolve=0.0", "> 0"]),
    (["benchmark", "--dry-run", "--resolve", "1", "--seeds", "0-4", "--max-seeds", "3"],
     ["max_seeds=3", ">= the 5 seed(s)"]),
    (["benchmark", "--dry-run", "--resolve", "1", "--max-seeds", "1"], ["--max-seeds"]),
    (["benchmark", "--preset", "cifar10-cpu", "--dry-run"],  # without ../shared/data
     ["../shared/data/cifar10", "prepare-data --source cifar10", "data.path=DIR"]),
    (EMBED + ["--split", "nope"], ["--split nope", "train"]),
    (EMBED[:-1] + ["{root}/features.csv"], ["--out", ".npz"]),
    (EMBED[:-1] + ["{root}"], ["--out", "is a directory"]),
    (EMBED + ["--blocks", "0"], ["--blocks"]),
    (EMBED + ["--blocks", "3"], ["--blocks 3", "1-2"]),  # the tiny model has 2 blocks
    (["embed", "--checkpoint", "{root}/none.pt", "--data", "{data}", "--out", "{root}/e.npz"],
     ["checkpoint not found", "models:/NAME/VERSION"]),
    (["embed", "--checkpoint", "models:/attmask-teacher/1", "--data", "{data}", "--out",
      "{root}/e.npz"], ["models:/attmask-teacher/1", "runs/ray/mlflow.db", "does not exist"]),
    # -- tracking URIs ----------------------------------------------------------------------------
    (["pretrain", "--config", "{cfg_ok}", "tracking.uri=./mlruns"], ["file store"]),
    (["pretrain", "--config", "{cfg_ok}", "tracking.uri=ftp://host/x"], ["tracking.uri"]),
    (["pretrain", "--config", "{cfg_ok}", "tracking.uri=sqlite:///{a_file}/sub/db"],
     ["tracking.uri"]),
    (EVAL + ["tracking.uri=./mlruns"], ["file store"]),
    (EVAL + ["tracking.uri=ftp://host/x"], ["tracking.uri"]),
]


class WorkStarted(Exception):
    pass


@pytest.fixture
def no_work(monkeypatch):
    """A case that gets past validation fails at once here, instead of training or starting Ray
    (it would fail the case anyway; this keeps the suite fast)."""
    import ray

    from attmask.engine import Engine

    def refuse(*args, **kwargs):
        raise WorkStarted("the command started work on a bad input")

    monkeypatch.setattr(Engine, "train_step", refuse)
    monkeypatch.setattr(ray, "init", refuse)


def case_id(index: int, case) -> str:
    argv, _ = case
    return f"{index:03d} " + " ".join(a.replace("{", "").replace("}", "")[:30] for a in argv)[:90]


@pytest.mark.parametrize("argv, words", CASES, ids=[case_id(i, c) for i, c in enumerate(CASES)])
def test_bad_input_is_one_line_exit_2_and_loses_nothing(world, no_work, capsys, argv,
                                                        words, tmp_path, monkeypatch):
    # A fresh working directory per case, as on a new clone: default outputs (runs/, the SQLite
    # tracking store) would land here, and a bad input must not create them.
    monkeypatch.chdir(tmp_path)
    argv = [a.format(**world) for a in argv]
    words = [w.format(**world) for w in words]
    before = snapshot(world["root"], world["data"])
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse's own exits
        code = exc.code
    _, err = capsys.readouterr()
    lines = [x for x in err.strip().splitlines() if x.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), err[-2000:]
    assert "Traceback" not in err and "weights_only=False" not in err
    for w in words:
        assert w in lines[0], (w, lines[0])
    assert snapshot(world["root"], world["data"]) == before
    assert not list(tmp_path.iterdir()), "a bad input created files in the working directory"


def test_the_suite_is_large_enough():
    assert len(CASES) >= 150
