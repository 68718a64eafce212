"""The end-to-end benchmark on a tiny configuration: report contents, HTML self-containment,
idempotent reruns, failures, and (where Debian's chromium is installed) a real rendering."""
import base64
import io
import json
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest
import yaml
from PIL import Image

from conftest import ROOT, tiny_yaml
from pipelines.benchmark import (
    load_benchmark,
    next_round,
    progress_line,
    run_benchmark,
    sequential_decisions,
    sequential_figure,
    sequential_table,
)
from pipelines.tracking import git_commit
from run_pipeline import main

pytestmark = pytest.mark.ray
STRATEGIES = ["random", "attmask_high"]


def write_bench(tmp_path, **extra):
    tiny_yaml(tmp_path / "tiny.yaml")
    bench = {
        "description": "test benchmark", "smoke": True,
        "data": {"source": "synthetic", "out": str(tmp_path / "data"), "num_samples": 160,
                 "num_test_samples": 40, "seed": 2},
        "preset": str(tmp_path / "tiny.yaml"),
        "overrides": {"train.epochs": 2, "train.steps_per_epoch": 2,
                      "train.output_dir": str(tmp_path / "runs"), "data.local_crops_number": 1,
                      "tracking.log_images_every_epochs": 0, "train.knn_train_samples": 80,
                      "train.knn_test_samples": 40},
        "strategies": STRATEGIES, "seeds": [0],
        "evaluation": {"suite": ["knn", "linear", "fewshot", "robustness", "attention"],
                       "probe_epochs": 3}, **extra}
    path = tmp_path / "bench.yaml"
    path.write_text(yaml.safe_dump(bench))
    return path


class Page(HTMLParser):
    def __init__(self):
        super().__init__()
        self.images, self.rows, self.external, self._row, self._cell = [], [], [], None, None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "img":
            self.images.append(attrs.get("src", ""))
        for key in ("src", "href"):
            if key in attrs and not attrs[key].startswith("data:"):
                self.external.append(attrs[key])
        if tag in ("link", "script", "iframe"):
            self.external.append(tag)
        if tag == "tr":
            self._row = []
        if tag == "td" and self._row is not None:
            self._cell = ""

    def handle_data(self, data):
        if self._cell is not None:
            self._cell += data

    def handle_endtag(self, tag):
        if tag == "td" and self._row is not None:
            self._row.append(self._cell)
            self._cell = None
        if tag == "tr" and self._row:
            self.rows.append(self._row)
            self._row = None


@pytest.fixture(scope="module")
def bench_run(ray_local, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bench")
    spec = load_benchmark(str(write_bench(tmp)))
    result = run_benchmark(spec, report_root=tmp / "reports", log=lambda s: None)
    return tmp, spec, result


def test_report_has_a_row_per_strategy_and_embedded_pngs_only(bench_run):
    _, _, result = bench_run
    assert not result.failed
    page = Page()
    page.feed(result.report_html.read_text())
    assert page.external == []  # nothing loaded from outside
    first_cells = [row[0] for row in page.rows]
    for strategy in STRATEGIES:  # one row per strategy in every metric table
        assert first_cells.count(strategy) >= 5, first_cells
    assert len(page.images) >= 3  # online k-NN, robustness, one overlay per strategy
    for src in page.images:
        match = re.fullmatch(r"data:image/png;base64,(.+)", src, re.S)
        assert match
        Image.open(io.BytesIO(base64.b64decode(match.group(1)))).verify()
    md = result.report_md.read_text()
    assert "SMOKE SCALE" in md and "| random |" in md and "BG-gap" in md
    # baselines lead every accuracy table; the paired table answers with one seed honestly
    for table in md.split("\n## ")[1:]:
        if table.startswith(("k-NN", "Linear probe", "Few-shot", "Background")) and \
                "| model |" in table:  # (a figure's caption can start the same way)
            rows = [line for line in table.splitlines() if line.startswith("| ")][1:]
            assert rows[0].startswith("| init (untrained, same seed) |"), table
            assert rows[1].startswith("| pixels |"), table
    assert "## Strategy vs random, paired over seeds" in md and "one seed: no interval" in md
    # ... and compares each strategy with random image by image on that seed's test images
    per_seed = md.split("## Strategy vs random, per seed: k-NN top-1 on the same test images")[1]
    rows = [line for line in per_seed.split("\n## ")[0].splitlines() if line.startswith("| ")]
    assert [row.split(" | ")[:2] for row in rows[1:]] == [[f"| {s}", "0"] for s in STRATEGIES
                                                         if s != "random"]
    assert md.split("\n\n")[1].startswith("Learning: k-NN top-1 gain over the untrained network")
    runs = {r.strategy: r.results for r in result.runs}
    assert runs["random"]["baselines"] == runs["attmask_high"]["baselines"]  # once per seed
    for line in md.splitlines():
        if line.startswith("![") and "(img/" in line:
            assert (result.report_md.parent / line.split("(")[1].rstrip(")")).is_file()


def test_parent_run_compares_strategies_and_the_experiment_opens_on_runs(bench_run):
    from mlflow.tracking import MlflowClient

    from pipelines.tracking import EXPERIMENT_KIND, resolve_tracking_uri, storage_path

    _, spec, result = bench_run
    cfg = next(iter(spec.configs.values()))
    client = MlflowClient(tracking_uri=resolve_tracking_uri(cfg, storage_path(cfg)))
    parent = client.get_run(result.parent_run_id)
    for r in result.runs:  # the cost is the trainer's clock, which a resumed run carries on
        clock = client.get_metric_history(r.mlflow_run_id, "train_s")
        assert r.train_s == pytest.approx(max(m.value for m in clock)) and r.train_s > 0
        assert r.images_per_s == pytest.approx(4 * cfg.train.batch_size_per_worker / r.train_s)
    for r in result.runs:
        assert parent.data.metrics[f"knn_top1/{r.strategy}"] == pytest.approx(
            r.results["knn"]["k20"]["top1"])  # one seed: the mean is the run's value
    experiment = client.get_experiment(parent.info.experiment_id)
    assert experiment.tags[EXPERIMENT_KIND[0]] == EXPERIMENT_KIND[1]


def test_rerun_reuses_finished_runs(bench_run):
    tmp, spec, first = bench_run
    again = run_benchmark(load_benchmark(str(tmp / "bench.yaml")), report_root=tmp / "reports",
                          log=lambda s: None)
    assert all(r.skipped for r in again.runs) and again.wall_s < first.wall_s
    assert [r.results["knn"] for r in again.runs] == [r.results["knn"] for r in first.runs]
    assert again.parent_run_id == first.parent_run_id
    # the report says how to continue into the same folder, which code ran, and what the
    # reused runs cost
    md = again.report_md.read_text()
    assert f"; commit {git_commit()}. " in md
    assert f"Reproduce: python run_pipeline.py benchmark --preset bench --reports {tmp / 'reports'}\n" \
        in md
    assert [r.train_s for r in again.runs] == [r.train_s for r in first.runs]
    machine = sum(r.machine_s for r in again.runs)
    assert machine > again.wall_s
    assert (f"Machine time: {machine:.0f} s of pretraining and evaluation for the 2 runs (over "
            f"all their sessions), {again.wall_s:.0f} s in this invocation") in md


def test_a_report_folder_carries_its_finished_runs_to_a_fresh_store(bench_run):
    """Another machine, or a fresh clone with a committed report folder: the MLflow store does
    not know the runs, and the same benchmark reuses them from the folder."""
    from mlflow.tracking import MlflowClient

    from pipelines.tracking import resolve_tracking_uri, storage_path

    tmp, spec, first = bench_run
    cfg = next(iter(spec.configs.values()))
    client = MlflowClient(tracking_uri=resolve_tracking_uri(cfg, storage_path(cfg)))
    shutil.copytree(tmp / "reports", tmp / "committed")
    gone = [r.mlflow_run_id for r in first.runs]
    for run_id in gone:  # out of every search the benchmark makes
        client.delete_run(run_id)
    try:
        again = run_benchmark(load_benchmark(str(tmp / "bench.yaml")),
                              report_root=tmp / "committed", log=lambda s: None)
        assert all(r.skipped for r in again.runs) and not again.failed
        assert [r.results for r in again.runs] == [r.results for r in first.runs]
        assert [r.knn_history for r in again.runs] == [r.knn_history for r in first.runs]
        assert [r.model_version for r in again.runs] == [r.model_version for r in first.runs]
        assert [r.train_s for r in again.runs] == [r.train_s for r in first.runs]
        assert again.report_md.read_text().count("reused (finished earlier)") == len(STRATEGIES)
        # a record of another configuration (another run name) is not reused: the run is redone
        record = tmp / "committed" / "bench" / "runs" / "random-s0" / "record.json"
        record.write_text(record.read_text().replace('"run_name": "bench-', '"run_name": "x-'))
        spec = load_benchmark(str(tmp / "bench.yaml"))
        spec.configs = {("random", 0): spec.configs[("random", 0)]}
        redone = run_benchmark(spec, report_root=tmp / "committed", log=lambda s: None)
        assert not redone.runs[0].skipped and not redone.failed, redone.runs[0].error
        assert '"run_name": "bench-' in record.read_text()  # rewritten by the run that redid it
        gone.append(redone.runs[0].mlflow_run_id)
    finally:
        for run_id in gone[:len(first.runs)]:
            client.restore_run(run_id)
        for run_id in gone[len(first.runs):]:
            client.delete_run(run_id)


def test_runs_reused_from_the_store_are_written_into_another_report_folder(bench_run):
    """The main job's runs, reused by `--seeds 0-2 --reports docs/results`: the committed folder
    must hold every run it reports, not a stale record of another configuration."""
    tmp, _, first = bench_run
    other = tmp / "other" / "bench" / "runs" / "random-s0"
    other.mkdir(parents=True)
    (other / "record.json").write_text(json.dumps({"run_name": "bench-00000000-random-s0"}))
    again = run_benchmark(load_benchmark(str(tmp / "bench.yaml")), report_root=tmp / "other",
                          log=lambda s: None)
    assert all(r.skipped for r in again.runs) and not again.failed
    for run in first.runs:
        here = tmp / "reports" / "bench" / "runs" / f"{run.strategy}-s{run.seed}"
        there = tmp / "other" / "bench" / "runs" / f"{run.strategy}-s{run.seed}"
        record = json.loads((there / "record.json").read_text())
        assert record["run_name"] == run.run_name and record["train_s"] == run.train_s
        assert json.loads((there / "results.json").read_text()) == run.results
        pictures = {p.name for p in here.glob("*.png")}
        assert pictures and pictures <= {p.name for p in there.glob("*.png")}


def test_more_seeds_train_only_the_new_runs_and_the_report_says_how(bench_run):
    """The question a 3-seed interval leaves open is answered by more seeds: the same benchmark
    with ``--seeds`` (or ``--strategies``) keeps what it finished."""
    tmp, spec, first = bench_run
    shutil.copytree(tmp / "reports", tmp / "extended")
    logged = []
    more = run_benchmark(load_benchmark(str(tmp / "bench.yaml"), seeds=[0, 1],
                                        strategies=["random"]),
                         report_root=tmp / "extended", log=logged.append)
    assert not more.failed
    # the job's position in its progress lines; no time left is guessed from a reused run
    assert [line for line in logged if line.startswith("run ")] == [
        "run 1 of 2: random seed 0; 0 min so far", "run 2 of 2: random seed 1; 0 min so far"]
    assert [(r.strategy, r.seed, r.skipped) for r in more.runs] == [("random", 0, True),
                                                                    ("random", 1, False)]
    assert more.runs[0].results["knn"] == first.runs[0].results["knn"]
    assert more.runs[1].run_name == spec.run_name("random", 1)  # the name it always had
    assert (f"Reproduce: python run_pipeline.py benchmark --preset bench --reports "
            f"{tmp / 'extended'} --seeds 0,1 --strategies random\n") in more.report_md.read_text()


def test_progress_says_which_run_of_the_job_and_how_long_the_rest_takes():
    assert progress_line(0, 6, "random", 0, 5.0, []) == "run 1 of 6: random seed 0; 0 min so far"
    assert progress_line(2, 6, "attmask_high", 1, 1500.0, [600.0, 900.0]) == (
        "run 3 of 6: attmask_high seed 1; 25 min so far, about 50 min left for the 4 run(s) "
        "to go")


def test_the_run_names_depend_on_the_shared_settings_not_on_the_lists(tmp_path):
    path = str(write_bench(tmp_path))
    base = load_benchmark(path)
    more = load_benchmark(path, seeds=[3, 0], strategies=["attmask_hint", "random"])
    assert set(more.configs) == {(s, seed) for s in ("attmask_hint", "random") for seed in (3, 0)}
    assert more.configs[("random", 3)].train.seed == 3
    assert more.run_name("random", 0) == base.run_name("random", 0)
    assert more.command() == ("python run_pipeline.py benchmark --preset bench --seeds 3,0 "
                              "--strategies attmask_hint,random")
    for changed in (load_benchmark(path, ["train.epochs=3"]),
                    load_benchmark(path, ["data.colour_on=batch"]),
                    load_benchmark(write_bench(tmp_path, seeds=[0], evaluation={"suite": ["knn"]})
                                   .as_posix())):
        assert changed.digest != base.digest


def test_committed_records_keep_the_names_their_preset_gives_them():
    """A config key added later must not rename the runs of a committed comparison (a rerun of
    its command would otherwise train them all again, or be refused as another benchmark)."""
    folders = [f for f in sorted(Path(ROOT, "docs", "results").iterdir())
               if f.is_dir() and f.name != "archive"]
    checked, absent = 0, set()
    for folder in folders:
        preset = folder.name
        source = yaml.safe_load(Path(ROOT, "configs", "benchmark", f"{preset}.yaml")
                                .read_text())["data"].get("from")
        if source and not Path(ROOT, source).exists():
            absent.add(source)  # that preset's data, and so its run names, cannot be resolved
            continue
        digest = load_benchmark(preset).digest
        assert json.loads((folder / "benchmark.json").read_text())["digest"] == digest, folder
        for record in folder.glob("runs/*/record.json"):
            saved = json.loads(record.read_text())
            assert saved["run_name"].startswith(f"bench-{preset}-{digest}-"), record
            assert saved["code_digest"] and saved["commit"], record  # which code trained it
            checked += 1
    if not checked:
        pytest.skip(f"{', '.join(sorted(absent)) or 'no committed records'}: no committed run "
                    "names to resolve")


def test_archived_results_say_why_they_are_archived():
    """Comparisons made before the val split (their monitor read test) stay for the record,
    out of the presets' folders, where a rerun cannot pair new runs with them."""
    archive = Path(ROOT, "docs", "results", "archive")
    assert "selected on the test split" in (archive / "README.md").read_text()
    for record in archive.glob("*/runs/*/record.json"):
        assert "code_digest" not in json.loads(record.read_text())


def test_failed_run_is_reported_and_exits_non_zero(ray_local, tmp_path, capsys):
    path = write_bench(tmp_path, strategies=["random"])
    code = main(["benchmark", "--preset", str(path), "--reports", str(tmp_path / "reports"),
                 "--inject-fault", "1:nan"])
    err = capsys.readouterr().err
    assert code == 1 and "failed: NonFiniteLossError" in err
    assert "FAILED RUNS" in (tmp_path / "reports" / "bench" / "report.md").read_text()


@pytest.mark.skipif(shutil.which("chromium") is None, reason="Debian's chromium not installed")
def test_report_renders_in_headless_chromium(bench_run, tmp_path):
    _, _, result = bench_run
    shot = tmp_path / "report.png"
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run(["chromium", *flags, "--dump-dom", result.report_html.as_uri()],
                         capture_output=True, text=True, timeout=120).stdout
    assert dom.count("<table>") >= 5 and dom.count("data:image/png;base64,") >= 3
    subprocess.run(["chromium", *flags, f"--screenshot={shot}", "--window-size=1200,3000",
                    result.report_html.as_uri()], capture_output=True, timeout=120)
    image = Image.open(shot)
    assert image.size == (1200, 3000)
    assert len(image.convert("L").getcolors(256)) > 20  # rendered content, not a blank page


@pytest.mark.parametrize("override", ["masking.strategy=random", "train.seed=7",
                                      "train.run_name=x"])
def test_swept_keys_cannot_be_overridden(tmp_path, capsys, override):
    # otherwise every run named ...-attmask_high-s0 would silently train another strategy/seed
    path = write_bench(tmp_path)
    assert main(["benchmark", "--preset", str(path), "--dry-run", override]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: override {override.split('=')[0]}")


def test_a_data_path_override_is_what_the_runs_train_and_are_evaluated_on(tmp_path):
    spec = load_benchmark("paper-20pct-in1k", [f"data.path={tmp_path}"])
    assert spec.data_dir == str(tmp_path) and spec.prepare_args() is None
    assert {c.data.path for c in spec.configs.values()} == {str(tmp_path)}


def test_every_benchmark_preset_resolves_and_pairs_its_runs_by_seed(tmp_path):
    from pipelines.benchmark import BENCH_DIR

    for path in sorted(BENCH_DIR.glob("*.yaml")):  # data.path: no preset's data is needed
        spec = load_benchmark(path.stem, [f"data.path={tmp_path}"])
        assert set(spec.configs) == {(s, seed) for s in spec.strategies for seed in spec.seeds}
        # seed-major: an interrupted benchmark (or one sitting of a long one) ends on whole pairs
        assert [seed for _, seed in spec.configs] == sorted(seed for _, seed in spec.configs)


def test_the_reproduce_command_names_the_report_folder_only_when_it_is_not_the_default(tmp_path):
    spec = load_benchmark(str(write_bench(tmp_path)), ["train.epochs=3"])
    assert spec.command() == "python run_pipeline.py benchmark --preset bench train.epochs=3"
    assert spec.command("docs/results") == \
        "python run_pipeline.py benchmark --preset bench --reports docs/results train.epochs=3"


def test_the_long_cpu_comparison_keeps_its_learning_rate_high_to_the_end(tmp_path):
    from attmask.runtime import cosine_schedule

    spec = load_benchmark("cifar10-cpu-long", [f"data.path={tmp_path}"])
    cfg = spec.configs[("random", 0)]
    o, t = cfg.optim, cfg.train
    peak = o.lr * t.batch_size_per_worker / o.lr_batch_reference
    lr = cosine_schedule(peak, o.min_lr, t.epochs, t.steps_per_epoch, warmup_epochs=o.warmup_epochs)
    assert len(lr) == 2800 and lr.max() == pytest.approx(5e-4)
    assert lr[-1] == pytest.approx(2.5e-4, rel=0.01)  # the floor: half the peak at the end
    assert spec.strategies == ["random", "attmask_high"] and spec.seeds == [0, 1, 2]


def test_runs_of_other_code_are_not_paired_with_new_runs(tmp_path, capsys):
    """A finished record of the same configuration but other code (another code digest) is
    refused before any work: pairing it with runs this checkout trains would put the code
    change into the strategies' difference. --allow-mixed-code lets it through; a benchmark
    whose runs all finished with one code only rebuilds its report."""
    from attmask.errors import UserError
    from pipelines.benchmark import check_same_code
    from pipelines.tracking import Tracker, code_digest

    path = write_bench(tmp_path)
    spec = load_benchmark(str(path))
    reports = tmp_path / "reports"
    folder = reports / "bench" / "runs" / "random-s0"
    folder.mkdir(parents=True)
    record = folder / "record.json"
    record.write_text(json.dumps({"run_name": spec.run_name("random", 0),
                                  "code_digest": "0123456789abcdef", "commit": "abc123"}))
    before = record.read_bytes()
    code = main(["benchmark", "--preset", str(path), "--reports", str(reports)])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err
    assert "trained by other code (code 0123456789abcdef, commit abc123)" in lines[0]
    assert "--allow-mixed-code" in lines[0] and not (tmp_path / "data").exists()  # no work done
    assert record.read_bytes() == before
    tracker = Tracker.connect(next(iter(spec.configs.values())))
    for strategy in STRATEGIES[1:]:  # every run finished, all by that other code: a report only
        other = reports / "bench" / "runs" / f"{strategy}-s0"
        other.mkdir(parents=True)
        (other / "record.json").write_text(record.read_text().replace(
            spec.run_name("random", 0), spec.run_name(strategy, 0)))
    check_same_code(spec, tracker, reports / "bench", code_digest())
    (folder / "record.json").write_text(record.read_text().replace("0123456789abcdef", "f" * 16))
    with pytest.raises(UserError, match="than the other finished runs"):
        check_same_code(spec, tracker, reports / "bench", code_digest())


def snapshot(folder: Path) -> dict:
    return {p.relative_to(folder): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


@pytest.mark.parametrize("dry", [True, False])
def test_a_report_folder_of_another_benchmark_is_refused_and_left_as_it_was(tmp_path, capsys,
                                                                           dry):
    """A second configuration into the same --reports would overwrite the first one's finished
    records and report (it did: one slot per strategy and seed): refused, naming both digests,
    before any work, whether the folder names its owner or only its records do."""
    path = write_bench(tmp_path)
    digest = load_benchmark(str(path)).digest
    flags = ["--dry-run"] if dry else []
    for owned_by in ("identity", "records"):
        reports = tmp_path / owned_by
        folder = reports / "bench"
        (folder / "runs" / "random-s0").mkdir(parents=True)
        (folder / "runs" / "random-s0" / "record.json").write_text(
            json.dumps({"run_name": "bench-bench-deadbeef-random-s0"}))
        (folder / "report.md").write_text("the committed comparison")
        if owned_by == "identity":
            (folder / "benchmark.json").write_text(json.dumps({"name": "bench",
                                                               "digest": "deadbeef"}))
        before = snapshot(reports)
        code = main(["benchmark", "--preset", str(path), "--reports", str(reports), *flags])
        lines = [l for l in capsys.readouterr().err.splitlines() if l.startswith("error: ")]
        assert code == 2 and len(lines) == 1
        assert "deadbeef" in lines[0] and digest in lines[0] and "--reports" in lines[0]
        assert snapshot(reports) == before and not (tmp_path / "data").exists()


def test_a_corrupt_record_is_named_not_trained_over(tmp_path, capsys):
    path = write_bench(tmp_path)
    spec = load_benchmark(str(path))
    record = tmp_path / "reports" / "bench" / "runs" / "random-s0" / "record.json"
    record.parent.mkdir(parents=True)
    record.write_text('{"run_name": "' + spec.run_name("random", 0) + '", "wall_s": 1')  # torn
    before = record.read_bytes()
    for flags in (["--dry-run"], []):
        code = main(["benchmark", "--preset", str(path), "--reports", str(tmp_path / "reports"),
                     *flags])
        lines = [l for l in capsys.readouterr().err.splitlines() if l.startswith("error: ")]
        assert code == 2 and len(lines) == 1 and str(record) in lines[0]
        assert "unreadable run record" in lines[0] and record.read_bytes() == before
    (tmp_path / "file").write_text("not a folder")
    code = main(["benchmark", "--preset", str(path), "--reports", str(tmp_path / "file"),
                 "--dry-run"])
    lines = [l for l in capsys.readouterr().err.splitlines() if l.startswith("error: ")]
    assert code == 2 and "--reports" in lines[0] and "not a directory" in lines[0]


def test_the_report_is_rebuilt_from_the_folder_alone(bench_run, tmp_path, capsys):
    """--report-only renders the report again from the records (newer report code, a folder
    from another machine): no data, no Ray, no tracking store."""
    tmp, _, first = bench_run
    folder = tmp_path / "copy"
    shutil.copytree(tmp / "reports", folder)
    before = (folder / "bench" / "report.md").read_text()
    (folder / "bench" / "report.md").unlink()
    code = main(["benchmark", "--preset", str(tmp / "bench.yaml"), "--reports", str(folder),
                 "--report-only"])
    assert code == 0, capsys.readouterr().err
    after = (folder / "bench" / "report.md").read_text()
    table = lambda text: text[text.index("## "):]  # noqa: E731 - the tables, not the intro
    assert table(after) == table(before)
    assert "Trained by: commit" in after
    empty = tmp_path / "empty"
    (empty / "bench").mkdir(parents=True)
    assert main(["benchmark", "--preset", str(tmp / "bench.yaml"), "--reports", str(empty),
                 "--report-only"]) == 2
    assert "holds no finished run" in capsys.readouterr().err


def knn_record(strategy, seed, top1):
    from pipelines.report import RunRecord

    return RunRecord(strategy, seed, f"{strategy}-s{seed}",
                     results={"knn": {"k20": {"top1": top1, "top5": 1.0, "n": 100}}})


def test_resolve_adds_seeds_only_for_undecided_comparisons_until_decided(tmp_path):
    """--resolve: after each round, one more seed for every comparison still undecided (and
    for the reference it is paired with); a decided comparison gets none."""
    spec = load_benchmark(str(write_bench(tmp_path, strategies=["random", "attmask_high",
                                                                "block"])),
                          seeds=[0, 1, 2], resolve=1.0, max_seeds=5)
    clear = {0: 0.60, 1: 0.605, 2: 0.61}  # attmask_high: +10 to +11 points on every seed
    noisy = {0: 0.45, 1: 0.55, 2: 0.50}  # block: -5, +5, 0: undecided
    runs = [knn_record("random", s, 0.50) for s in (0, 1, 2)] + \
        [knn_record("attmask_high", s, v) for s, v in clear.items()] + \
        [knn_record("block", s, v) for s, v in noisy.items()]
    assert next_round(spec, runs) == ["random", "block"]
    for strategy in ("random", "block"):
        spec.add_run(strategy, 3)
    assert spec.seeds == [0, 1, 2, 3] and spec.configs[("block", 3)].train.seed == 3
    assert spec.configs[("block", 3)].train.run_name == spec.run_name("block", 3)
    assert ("attmask_high", 3) not in spec.configs
    runs += [knn_record("random", 3, 0.50), knn_record("block", 3, 0.40)]
    decided = sequential_decisions(runs, spec.strategies, spec.sequential)
    assert decided["attmask_high"][-1].verdict == "better"
    assert [d.seeds for d in decided["block"]] == [1, 2, 3, 4]
    runs += [knn_record("random", 4, 0.50), knn_record("block", 4, 0.60)]
    spec.seeds.append(4)
    assert next_round(spec, runs) == []  # 5 seeds: the budget is spent
    table = sequential_table(runs, spec.strategies, spec.sequential)
    rows = {row[0]: row for row in table.rows}
    assert rows["attmask_high"][4] == "better" and rows["block"][4] == "undecided"
    assert "seed budget (5) spent" in rows["block"][5]
    assert "Bonferroni" in table.note and "at most 0.05" in table.note
    name, _, png = sequential_figure(runs, spec.strategies, spec.sequential)
    assert name == "sequential.png" and png.startswith(b"\x89PNG")
    # the digest, and so every run name, is that of the same benchmark without --resolve
    assert spec.digest == load_benchmark(str(tmp_path / "bench.yaml")).digest
