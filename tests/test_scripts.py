"""Every script under docs/ and studies/ runs, in its smoke mode (``SMOKE=1``: the same commands
on tiny generated data for a few steps), so that none of them can rot. A new script fails
``test_every_script_has_a_smoke_run`` until it gets a line in ``SMOKE_RUNS``.

About 4 minutes in all (two scripts start Ray), so these run apart, like the multi-node tests:
``python -m pytest -m scripts`` (``.ci/run`` does).
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from attmask.data.prepare import PrepareArgs, prepare_data

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = sorted(p.relative_to(ROOT).as_posix() for folder in ("docs", "studies")
                 for p in (ROOT / folder).rglob("*") if p.suffix in (".py", ".sh"))

# script -> its arguments; {tmp} is this run's folder, {ckpt} a tiny training checkpoint.
# A string instead of a list says why the script is not run on its own.
SMOKE_RUNS: dict[str, list[str] | str] = {
    "docs/paper-smoke.sh": ["{tmp}/paper"],
    "docs/speed/colour_on.sh": [],
    "docs/speed/loop_breakdown.py": ["batch", "0", "6"],
    "docs/speed/rss_per_step.py": ["tiny-cpu", "fp32", "2"],
    "docs/speed/sdpa_kernels.py": ["tiny-cpu", "fp32"],
    "docs/synthetic_colours.py": ["{tmp}/colours.png"],
    "studies/paper-claims/run.sh": ["0"],
    "studies/smoke.sh": "sourced by every shell script here",
    "studies/small-scale/class_hue_data.py": ["{tmp}/hue"],
    "studies/small-scale/data_colours.sh": [],
    "studies/small-scale/plot.py": ["studies/small-scale/curves", "{tmp}/plot.png"],
    "studies/small-scale/student_knn.py": ["{ckpt}"],
    "studies/small-scale/study.sh": ["AH-AG-colourbatch"],
    "studies/small-scale/supervised_reference.py": ["{tmp}/supervised"],
    "studies/small-scale/test_images.py": "run at the end of test_images.sh, on its evaluations",
    "studies/small-scale/test_images.sh": [],
    "studies/small-scale/view_agreement.py": ["{ckpt}"],
}
# What each run must print, or ({tmp}/...) write, beyond exiting 0: a script that silently does
# nothing fails.
EXPECT = {
    "docs/paper-smoke.sh": "{tmp}/paper/reports/paper-20pct-in1k/report.md",
    "docs/synthetic_colours.py": "{tmp}/colours.png",
    "studies/small-scale/class_hue_data.py": "{tmp}/hue/dataset.json",
    "studies/small-scale/study.sh": "{tmp}/out/AH-AG-colourbatch/teacher_backbone.safetensors",
    "docs/speed/colour_on.sh": "img/s",
    "docs/speed/loop_breakdown.py": "img/s",
    "docs/speed/rss_per_step.py": "peak:",
    "docs/speed/sdpa_kernels.py": "images/s",
    "studies/paper-claims/run.sh": "dry run",
    "studies/small-scale/data_colours.sh": "last - init",
    "studies/small-scale/plot.py": "AH-AG-colourbatch",
    "studies/small-scale/student_knn.py": "student",
    "studies/small-scale/supervised_reference.py": "k-NN",
    "studies/small-scale/test_images.sh": "gain over init",
    "studies/small-scale/view_agreement.py": "same image",
}


def test_every_script_has_a_smoke_run():
    assert SCRIPTS, "no scripts found: the glob is wrong"
    runs = {s for s, how in SMOKE_RUNS.items() if isinstance(how, list)}
    assert runs == set(EXPECT), f"runs without an expected output: {sorted(runs - set(EXPECT))}"
    assert sorted(SMOKE_RUNS) == SCRIPTS, (
        f"scripts without a smoke run: {sorted(set(SCRIPTS) - set(SMOKE_RUNS))}; "
        f"listed but gone: {sorted(set(SMOKE_RUNS) - set(SCRIPTS))}")


@pytest.fixture(scope="module")
def smoke_env(tmp_path_factory, tiny_checkpoint) -> dict:
    """A CIFAR-10 look-alike (.npz folder in its layout: 10 classes, 32 px), its shards, and the
    environment every script reads in smoke mode."""
    root = tmp_path_factory.mktemp("scripts")
    cifar = root / "cifar10"
    cifar.mkdir()
    rng = np.random.default_rng(0)
    for name, n in (("train_00.npz", 300), ("test.npz", 100)):
        labels = np.arange(n) % 10
        # each class a brightness level plus noise: k-NN has something to find
        images = (labels[:, None, None, None] * 20 + rng.integers(0, 60, (n, 32, 32, 3)))
        np.savez(cifar / name, images=images.astype(np.uint8), labels=labels)
    shards = root / "cifar10-shards"
    prepare_data(PrepareArgs(source="cifar10", from_path=str(cifar), out=str(shards)))
    return {"root": root, "ckpt": tiny_checkpoint,
            "env": {**os.environ, "SMOKE": "1", "CIFAR10": str(cifar),
                    "STUDY_DATA": str(shards), "PYTHONPATH": str(ROOT),
                    "MLFLOW_TRACKING_URI": f"sqlite:///{root}/mlflow.db"}}


@pytest.mark.scripts
@pytest.mark.parametrize("script", [s for s in SCRIPTS if isinstance(SMOKE_RUNS.get(s), list)])
def test_script_runs_in_smoke_mode(script, smoke_env):
    tmp = smoke_env["root"] / Path(script).stem
    tmp.mkdir()
    args = [a.format(tmp=tmp, ckpt=smoke_env["ckpt"]) for a in SMOKE_RUNS[script]]
    runner = ["bash"] if script.endswith(".sh") else [sys.executable]
    env = dict(smoke_env["env"], STUDY_DIR=str(tmp / "out"))
    proc = subprocess.run(runner + [script, *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=420)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{script} exited {proc.returncode}:\n{output[-3000:]}"
    expect = EXPECT[script]
    if expect.startswith("{tmp}"):
        assert Path(expect.format(tmp=tmp)).is_file(), f"{script} wrote no {expect}:\n{output[-3000:]}"
    else:
        assert expect in output, f"{script} printed:\n{output[-3000:]}"
