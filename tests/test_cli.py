"""The CLI's error rule (one ``error:`` line, exit 2, no traceback) and smoke runs."""
import json
import subprocess
import sys

import pytest

from attmask.errors import ConfigError
from conftest import ROOT, TINY, tiny_yaml
from run_pipeline import main


def run_main(capsys, *argv):
    try:
        code = main(list(argv))
    except SystemExit as exc:  # argparse's own exits
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_error_line(code, err, *words):
    lines = [x for x in err.strip().splitlines() if x.strip()]
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    for w in words:
        assert w in lines[0], (w, lines[0])


@pytest.mark.parametrize("argv, words", [
    (["pretrain-local", "--preset", "nope"], ["preset 'nope' not found", "tiny-cpu"]),
    (["pretrain-local", "masking.ratio=[0.6,0.2]"], ["masking.ratio"]),
    (["pretrain-local", "data.path=/nonexistent/dir"], ["/nonexistent/dir/dataset.json"]),
    (["pretrain-local", "--config", "/nonexistent.yaml"], ["/nonexistent.yaml"]),
    (["bench-step", "--strategies", "random,bogus"], ["bogus", "attmask_high"]),
    (["prepare-data", "--source", "bogus", "--out", "/tmp/x"], ["--source", "synthetic"]),
    (["prepare-data", "--source", "npz", "--out", "/tmp/x"], ["needs --from"]),
    (["prepare-data", "--source", "npz", "--from", "/nonexistent", "--out", "/tmp/x"],
     ["/nonexistent"]),
    (["prepare-data", "--source", "synthetic", "--out", "/tmp/x", "--num-classes", "50"],
     ["num_classes"]),
    (["bench-data", "--data", "/nonexistent"], ["/nonexistent/dataset.json"]),
    (["no-such-command"], ["invalid choice"]),
    (["prepare-data", "--out", "/tmp/x"], ["--source"]),
])
def test_bad_input_prints_one_error_line_and_exits_2(capsys, argv, words):
    code, _, err = run_main(capsys, *argv)
    assert_one_error_line(code, err, *words)


def test_debug_flag_shows_the_traceback(capsys):
    with pytest.raises(ConfigError, match="not found"):
        main(["--debug", "pretrain-local", "--preset", "nope"])


def test_help_lists_subcommands(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for cmd in ("pretrain-local", "bench-step", "prepare-data", "bench-data"):
        assert cmd in out


def test_worker_side_data_error_is_one_line_from_a_real_process(tmp_path, synthetic_dir):
    """A label error raised inside a DataLoader worker process still prints one line."""
    import shutil

    import numpy as np
    import webdataset as wds

    from attmask.data.shards import png_bytes, sha256_file

    data = tmp_path / "bad"
    shutil.copytree(synthetic_dir, data)
    manifest = json.loads((data / "dataset.json").read_text())
    for shard in manifest["splits"]["train"]["shards"]:
        with wds.TarWriter(str(data / shard["file"])) as w:
            for i in range(shard["num_samples"]):
                w.write({"__key__": f"k{i}", "png": png_bytes(np.zeros((32, 32, 3), np.uint8)),
                         "cls": b"42"})
        shard["sha256"] = sha256_file(data / shard["file"])
    (data / "dataset.json").write_text(json.dumps(manifest))
    proc = subprocess.run([sys.executable, str(ROOT / "run_pipeline.py"), "pretrain-local",
                           *TINY, f"data.path={data}", "data.num_workers=1",
                           f"train.output_dir={tmp_path}/runs"],
                          capture_output=True, text=True, timeout=300)
    lines = [x for x in proc.stderr.splitlines() if x.startswith("error:")]
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert len(lines) == 1 and "label 42 outside the manifest's 10 classes" in lines[0]


def test_prepare_data_and_pretrain_local_smoke(capsys, tmp_path):
    out = tmp_path / "d"
    code, stdout, _ = run_main(capsys, "prepare-data", "--source", "synthetic", "--out", str(out),
                               "--num-samples", "48", "--num-test-samples", "8")
    assert code == 0 and "wrote" in stdout  # 10 % of each class held out as val
    assert "train 44 in 8 shards, val 4 in 1 shards" in stdout
    code, stdout, _ = run_main(capsys, "prepare-data", "--source", "synthetic", "--out", str(out),
                               "--num-samples", "48", "--num-test-samples", "8")
    assert code == 0 and "nothing to do" in stdout
    code, stdout, _ = run_main(capsys, "pretrain-local", *TINY, f"data.path={out}",
                               "train.epochs=1", f"train.output_dir={tmp_path / 'runs'}")
    assert code == 0 and "done: 5 steps" in stdout and "epoch 1/1 step 5/5" in stdout


def test_nan_loss_is_one_line_naming_the_step(capsys, tmp_path, synthetic_dir):
    code, _, err = run_main(capsys, "pretrain-local", *TINY, f"data.path={synthetic_dir}",
                            "train.steps_per_epoch=3", "--inject-fault", "2:nan",
                            f"train.output_dir={tmp_path}")
    assert_one_error_line(code, err, "loss is nan at step 2", "optim.lr")


def test_bench_step_reports_ratios_bound_and_flops(capsys, tmp_path):
    cfg = tiny_yaml(tmp_path / "tiny.yaml")
    out = tmp_path / "bench.json"
    code, _, _ = run_main(capsys, "bench-step", "--config", str(cfg), "--steps", "2",
                          "--warmup", "1", "--strategies", "random,attmask_hint",
                          "--json", str(out))
    assert code == 0
    result = json.loads(out.read_text())
    hint = result["strategies"]["attmask_hint"]
    assert result["strategies"]["random"]["ratio_to_random"] == 1.0
    assert hint["images_per_s"] > 0 and hint["timed_steps"] == 2 and hint["gflop_per_step"] > 0
    assert 2.0 < result["ibot_image_cost_in_plain_images"] < 6.0
    assert result["bound_images_per_s"] > 0 and result["matmul_peak_gflop_s"]["fp32"] > 0
    assert result["peak_rss_mb"] > 0


def test_bench_step_compares_compiled_steps_and_profiles(capsys, tmp_path):
    """--compare-compile times a compiled engine beside the eager one; --only-steps leaves out
    the bound (so the peak RSS is the steps' own); --profile names the ops with most self time."""
    cfg = tiny_yaml(tmp_path / "tiny.yaml", "train.precision=fp32")
    out = tmp_path / "bench.json"
    code, _, _ = run_main(capsys, "bench-step", "--config", str(cfg), "--steps", "2",
                          "--warmup", "1", "--strategies", "random", "--compare-compile",
                          "--only-steps", "--profile", "--json", str(out))
    assert code == 0
    result = json.loads(out.read_text())
    assert set(result["strategies"]) == {"random", "random+compiled"}
    assert "bound_images_per_s" not in result and "matmul_peak_gflop_s" not in result
    compiled = result["compile"]
    assert compiled["graphs"] >= 1 and compiled["recompiles_after_first_round"] == 0
    assert compiled["random"]["speedup"] > 0 and compiled["compile_s"] > 0
    top = result["profile_top10"]
    assert len(top) == 10 and top[0]["self_ms_per_step"] >= top[-1]["self_ms_per_step"] > 0
    assert 0 < sum(row["share"] for row in top) <= 1.0 + 1e-9


def test_bench_data_reports_both_settings(capsys, synthetic_dir, tmp_path):
    out = tmp_path / "data.json"
    code, _, _ = run_main(capsys, "bench-data", "--data", str(synthetic_dir), "--workers", "0",
                          "--batches", "1", "--batch-size", "4", "--json", str(out))
    assert code == 0
    result = json.loads(out.read_text())
    assert set(result["settings"]) == {f"{crops}/colour_on={on}" for on in ("image", "batch")
                                       for crops in ("tiny-cpu", "224px-10local")}
    assert all(s["images_per_s"] > 0 for s in result["settings"].values())


@pytest.mark.parametrize("argv, words", [
    (["evaluate", "--data", "/tmp"], ["--checkpoint", "--mlflow-run"]),
    (["evaluate", "--checkpoint", "/nonexistent.pt", "--data", "/tmp"],
     ["checkpoint not found: /nonexistent.pt"]),
    (["pretrain", "data.path=/nonexistent"], ["/nonexistent/dataset.json"]),
    (["pretrain", "tracking.uri=./mlruns", "data.path=/nonexistent"], ["file store"]),
    (["tune", "/nonexistent.yaml"], ["search file not found: /nonexistent.yaml"]),
    (["tune", "tune_configs/strategy.yaml", "masking.ratio=[2,3]", "--dry-run"],
     ["base/overrides", "masking.ratio"]),
])
def test_pipeline_commands_follow_the_error_rule(capsys, argv, words):
    code, _, err = run_main(capsys, *argv)
    assert_one_error_line(code, err, *words)


def test_an_error_raised_in_a_ray_task_is_its_own_one_line_message():
    from ray.exceptions import RayTaskError

    from attmask.errors import DataError
    from run_pipeline import one_line

    cause = DataError("shard missing: /data/train-000003.tar (listed in /data/dataset.json)")
    wrapped = RayTaskError("_run_part", "Traceback (most recent call last):\n" + "x\n" * 80,
                           cause).as_instanceof_cause()
    assert isinstance(wrapped, DataError) and len(str(wrapped)) > 200
    assert one_line(wrapped) == str(cause)


def test_overrides_may_come_anywhere_among_the_flags():
    from run_pipeline import build_parser, parse

    args = parse(build_parser(), ["pretrain-local", "train.epochs=1", "--max-steps", "1",
                                  "train.run_name=x"])
    assert args.overrides == ["train.epochs=1", "train.run_name=x"] and args.max_steps == 1
    with pytest.raises(SystemExit):
        parse(build_parser(), ["pretrain-local", "--max-steps", "1", "--bogus"])


def test_device_check_quick_mode_writes_every_figure(capsys, tmp_path):
    out = tmp_path / "check.json"
    code, stdout, err = run_main(capsys, "device-check", "--quick", "--device", "cpu",
                                 "--json", str(out))
    assert code == 0, err
    result = json.loads(out.read_text())
    assert set(result["bench_step"]) == {"tiny-cpu/fp32", "tiny-cpu/bf16"}
    for figures in result["bench_step"].values():
        assert figures["random"]["images_per_s"] > 0 and figures["attmask_high"]["images_per_s"] > 0
        assert figures["bound_images_per_s"] > 0
    p = result["pretrain"]
    assert p["steps"] == 3 and p["all_finite"] and 0 < p["masked_fraction_mean"] < 0.5
    assert 0 < p["teacher_flatness_last"] <= 1 and p["images_per_s_with_crops_on_cpu"] > 0
    ddp = result["ddp"]  # the same step through DDP, two gloo processes
    assert ddp["world_size"] == 2 and ddp["backend"] == "gloo" and ddp["images_per_s"] > 0
    assert ddp["max_weight_difference_between_ranks"] == 0  # replicas stay identical


def test_device_check_and_bench_step_need_only_torch_and_timm(tmp_path):
    """The GPU machine has torch and timm but not ray, mlflow or webdataset."""
    script = f"""
import sys
class Absent:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("ray", "mlflow", "webdataset"):
            raise ImportError(f"{{name}} is not installed here")
sys.meta_path.insert(0, Absent())
sys.path.insert(0, {str(ROOT)!r})
from run_pipeline import main
assert main(["device-check", "--quick", "--device", "cpu", "--json", {str(tmp_path / "c.json")!r}]) == 0
assert main(["bench-step", "--preset", "tiny-cpu", "--steps", "1", "--warmup", "0",
             "--strategies", "random", "model.depth=1"]) == 0
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
