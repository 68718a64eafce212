"""The report builder on hand-made run records: baselines first, gains over init, the paired
table with known numbers, and the takeaways a reader sees first."""
import math

import numpy as np
import pytest
from scipy.stats import norm

from attmask.eval.results import KNN_TOP1, encode_hits
from attmask.eval.stats import paired_difference, t_quantile
from pipelines.report import (
    Rows,
    RunRecord,
    build_tables,
    paired_table,
    per_seed_table,
    takeaways,
)

STRATEGIES = ["random", "attmask_high"]


def record(strategy, seed, knn, linear, init_knn=0.30, masked=None, n_test=None):
    results = {"knn": {"k20": {"top1": knn, "top5": knn + 0.3, **({"n": n_test} if n_test else {})}},
               "linear": {"top1": linear,
                                                                          "val_top1": linear},
               "baselines": {"init": {"knn": {"k20": {"top1": init_knn + seed / 100,
                                                      "top5": 0.7}},
                                      "linear": {"top1": 0.35, "val_top1": 0.35}},
                             "pixels": {"knn": {"k20": {"top1": 0.46, "top5": 0.8}},
                                        "linear": {"top1": 0.40, "val_top1": 0.40}}}}
    if masked is not None:
        results["attention"] = {"masked_on_object": masked, "object_share": 0.3,
                                "topk_on_object": 0.5}
    return RunRecord(strategy, seed, f"{strategy}-s{seed}", results=results)


def runs_with(diffs):
    """random at 0.40 + seed/100 per seed; attmask_high that plus the given difference."""
    out = []
    for seed, d in enumerate(diffs):
        base = 0.40 + seed / 100
        out += [record("random", seed, base, 0.5), record("attmask_high", seed, base + d, 0.5,
                                                          masked=0.6)]
    return out


def test_paired_table_has_the_known_interval():
    runs = runs_with([0.01, 0.02, 0.03])
    table = paired_table(Rows.of(runs, STRATEGIES), STRATEGIES)
    knn = next(row for row in table.rows if row[1] == "k-NN top-1")
    half = 4.302653 * 1.0 / math.sqrt(3)  # points: differences 1, 2, 3
    assert knn[:4] == ["attmask_high", "k-NN top-1", "3", "+2.0"]
    assert knn[4] == f"[{2 - half:+.1f}, {2 + half:+.1f}]"
    assert knn[5] == "not distinguishable at this budget"
    # spread 1 point per seed: n seeds with t(n-1) / sqrt(n) <= 1.5, i.e. 5 (2.776 / 2.236); an
    # estimate from 3 seeds: the spread's 95 % chi-square interval [0.52, 6.28] gives 3 to 70
    assert knn[6] == "5 (3-70)"
    linear = next(row for row in table.rows if row[1] == "linear top-1")
    assert linear[3] == "+0.0" and linear[4] == "[+0.0, +0.0]"
    better = paired_table(Rows.of(runs_with([0.05, 0.051, 0.049]), STRATEGIES), STRATEGIES)
    assert better.rows[0][5] == "better"


def test_baseline_rows_and_gains_over_init_per_seed():
    runs = runs_with([0.01, 0.02, 0.03])
    knn_table = build_tables(runs, STRATEGIES)[0]
    labels = [row[0] for row in knn_table.rows]
    assert labels == ["init (untrained, same seed)", "pixels", "random", "attmask_high"]
    init_row, pixel_row, random_row, high_row = knn_table.rows
    assert init_row[1] == "31.0 ± 1.0" and init_row[3] == "0 (reference)"
    assert pixel_row[1] == "46.0"  # one row whatever the number of seeds
    # random = 0.40 + s/100, init = 0.30 + s/100: a gain of exactly 10 points on every seed
    assert random_row[3] == "+10.0 ± 0.0"
    assert high_row[3] == "+12.0 ± 1.0"


def test_takeaways_lead_with_gain_verdict_and_object_masking():
    lines = takeaways(Rows.of(runs_with([0.01, 0.02, 0.03]), STRATEGIES), STRATEGIES)
    assert lines[0].startswith("Learning: k-NN top-1 gain over the untrained network")
    assert "95 % interval over seeds" in lines[0] and "raw pixels 46.0 %" in lines[0]
    # random gains exactly 10 points on every seed; attmask_high 11, 12, 13 (t interval)
    assert "random +10.0 [+10.0, +10.0] above init" in lines[0]
    half = 4.302653 / math.sqrt(3)
    assert f"attmask_high +12.0 [{12 - half:+.1f}, {12 + half:+.1f}] above init" in lines[0]
    # paired: differences 1, 2, 3 points -> mean 2, std 1, the same t interval
    assert (f"attmask_high +2.0 [{2 - half:+.1f}, {2 + half:+.1f}] over 3 seeds "
            "(not distinguishable at this budget)") in lines[1]
    assert lines[2].startswith("AttMask-High hides more of the object than random masking")
    assert "60.0 ± 0.0 % of its masked patches lie on the object" in lines[2]
    assert "object share of 30.0 ± 0.0 %" in lines[2]


def test_takeaways_say_when_attmask_high_hides_less_of_the_object():
    runs = [record("random", 0, 0.40, 0.5), record("attmask_high", 0, 0.41, 0.5, masked=0.006)]
    line = takeaways(Rows.of(runs, STRATEGIES), STRATEGIES)[-1]
    assert line.startswith("AttMask-High hides less of the object than random masking: 0.6")
    assert "object share of 30.0 %" in line


def test_one_seed_gain_is_judged_against_the_test_images():
    # one seed, 1,000 test images: +10 points is beyond the sampling error, +1 is not
    runs = [record("random", 0, 0.31, 0.5, n_test=1000),
            record("attmask_high", 0, 0.40, 0.5, n_test=1000)]
    line = takeaways(Rows.of(runs, STRATEGIES), STRATEGIES)[0]
    assert "from the test images' sampling error alone (one seed)" in line
    assert "random +1.0 [-3.0, +5.0] not distinguishable from init" in line
    assert "attmask_high +10.0 [+5.8, +14.2] above init" in line
    # results written before the test count was recorded: gains without a verdict
    old = [record("random", 0, 0.31, 0.5)]
    assert "random +1.0 (" in takeaways(Rows.of(old, ["random"]), ["random"])[0]
    # one seed: the paired difference without an interval, and says why
    assert "attmask_high +9.0 (one seed: no interval)" in \
        takeaways(Rows.of(runs, STRATEGIES), STRATEGIES)[1]


def test_one_seed_and_missing_reference():
    runs = runs_with([0.02])
    table = paired_table(Rows.of(runs, STRATEGIES), STRATEGIES)
    assert table.rows[0][4] == "—" and table.rows[0][5] == "one seed: no interval"
    assert paired_table(Rows.of(runs, ["attmask_high"]), ["attmask_high"]) is None
    with pytest.raises(StopIteration):
        next(row for row in table.rows if row[1] == "BG-gap")  # no robustness results


def test_a_resumed_run_costs_all_its_sessions_and_an_old_record_its_wall_time():
    resumed = record("random", 0, 0.4, 0.5)
    resumed.results["wall_s"] = 200.0  # evaluation
    resumed.wall_s, resumed.train_s = 1300.0, 3000.0  # the last session ran 1,100 s of 3,000
    old = record("attmask_high", 0, 0.4, 0.5)  # from before the trainer's clock was recorded
    old.results["wall_s"], old.wall_s = 200.0, 3500.0
    assert resumed.machine_s == 3200.0 and old.machine_s == 3500.0
    cost = next(t for t in build_tables([resumed, old], STRATEGIES) if t.title == "Cost per run")
    assert cost.columns[1:3] == ["pretraining (s)", "evaluation (s)"]
    assert cost.rows[0][1:3] == ["3000", "200"] and cost.rows[1][1:3] == ["—", "200"]


KEYS = [f"test{i:04d}" for i in range(1000)]


def with_hits(run, right, keys=KEYS, init_right=None):
    """``run`` with per-image k-NN hits: the first ``right`` of 1,000 test images correct."""
    hits = np.arange(len(keys)) < right
    run.results["knn"]["k20"].update(top1=right / len(keys), n=len(keys),
                                     **encode_hits(hits, keys))
    if init_right is not None:
        init = run.results["baselines"]["init"]["knn"]["k20"]
        init.update(top1=init_right / len(keys), n=len(keys),
                    **encode_hits(np.arange(len(keys)) < init_right, keys))
    return run


def test_per_seed_differences_are_measured_image_by_image():
    # seed 0: high right on 30 more images than random (+3 points), seed 1 on 10 fewer (-1)
    runs = [with_hits(record(strategy, seed, 0, 0.5), right) for strategy, seed, right in
            (("random", 0, 400), ("attmask_high", 0, 430), ("random", 1, 410),
             ("attmask_high", 1, 400))]
    table = per_seed_table(Rows.of(runs, STRATEGIES), STRATEGIES)
    assert [row[:3] for row in table.rows] == [["attmask_high", "0", "+3.00"],
                                               ["attmask_high", "1", "-1.00"]]
    se0 = np.r_[np.ones(30), np.zeros(970)].std(ddof=1) / math.sqrt(1000)
    half = 1.959964 * se0
    assert table.rows[0][3] == f"[{100 * (0.03 - half):+.2f}, {100 * (0.03 + half):+.2f}]"
    assert [row[5] for row in table.rows] == ["3.0", "1.0"]
    p = [2 * norm.sf(0.03 / se0), 2 * norm.sf(0.01 / (np.r_[-np.ones(10), np.zeros(990)]
                                                     .std(ddof=1) / math.sqrt(1000)))]
    smaller, larger = sorted(p)  # Holm: the smaller p times 2, the larger times 1 (monotone)
    holm = {smaller: min(1, 2 * smaller), larger: max(min(1, 2 * smaller), larger)}
    assert [row[4] for row in table.rows] == [f"{holm[v]:.3f}" for v in p]
    assert "Cochran's Q" in table.note and "differ beyond their noise" in table.note
    # the note splits the spread: std of (+3, -1) is 2.83 points, the images explain ~0.45
    se1 = np.r_[-np.ones(10), np.zeros(990)].std(ddof=1) / math.sqrt(1000)
    test = math.sqrt((se0 ** 2 + se1 ** 2) / 2)
    training = math.sqrt(0.02 ** 2 * 2 - test ** 2)
    assert (f"the 2 per-seed differences spread by 2.83 points (std); the test images' sampling "
            f"explains {100 * test:.2f} of it and how the training runs went {100 * training:.2f}"
            ) in table.note
    floor = t_quantile(0.95, 1) * training / math.sqrt(2)
    assert f"interval over these seeds would still be ±{100 * floor:.1f}" in table.note
    assert "no number of test images brings it to ±1.5 with these seeds" in table.note
    # it comes right after the paired table in the report
    titles = [t.title for t in build_tables(runs, STRATEGIES)]
    assert titles[1].startswith("Strategy vs random, paired") and titles[2] == table.title


def test_a_seed_whose_networks_agree_on_every_image_gets_no_cochran_q_and_no_crash():
    # seed 1: both networks right on the same 400 images: a difference of 0 with no error
    runs = [with_hits(record(strategy, seed, 0, 0.5), right) for strategy, seed, right in
            (("random", 0, 400), ("attmask_high", 0, 430), ("random", 1, 400),
             ("attmask_high", 1, 400))]
    table = per_seed_table(Rows.of(runs, STRATEGIES), STRATEGIES)
    assert [row[2] for row in table.rows] == ["+3.00", "+0.00"]
    assert "Cochran's Q is not defined here" in table.note


def test_per_seed_rows_need_hits_on_the_same_test_images():
    runs = [with_hits(record("random", 0, 0, 0.5), 400),
            with_hits(record("attmask_high", 0, 0, 0.5), 430, keys=KEYS[::-1]),
            with_hits(record("random", 1, 0, 0.5), 400), record("attmask_high", 1, 0.43, 0.5)]
    assert per_seed_table(Rows.of(runs, STRATEGIES), STRATEGIES) is None
    assert per_seed_table(Rows.of(runs_with([0.01, 0.02]), STRATEGIES), STRATEGIES) is None


def test_one_seed_gain_over_init_is_measured_image_by_image_where_recorded():
    # 1,000 images: the run is right on 340, its init on the first 300 of them: +4 points, and
    # every image the init gets right the run gets right too, so the interval is narrow
    run = with_hits(record("random", 0, 0, 0.5), 340, init_right=300)
    line = takeaways(Rows.of([run], ["random"]), ["random"])[0]
    se = np.r_[np.ones(40), np.zeros(960)].std(ddof=1) / math.sqrt(1000)
    assert (f"random +4.0 [{100 * (0.04 - 1.959964 * se):+.1f}, "
            f"{100 * (0.04 + 1.959964 * se):+.1f}] above init") in line


def test_k_nn_intervals_over_seeds_include_the_shared_test_images():
    """With per-image hits on one test set, the gain over init and the paired k-NN difference
    are two-way (seeds x test images), and wider than the seeds-alone interval when the seeds
    agree: they add the error of the one test set every seed is read on."""
    runs = [with_hits(record(strategy, seed, 0, 0.5), right, init_right=400 + seed)
            for strategy, seed, right in (("random", 0, 420), ("attmask_high", 0, 440),
                                          ("random", 1, 421), ("attmask_high", 1, 441),
                                          ("random", 2, 422), ("attmask_high", 2, 442))]
    rows = Rows.of(runs, STRATEGIES)
    gain = rows.gain_interval("attmask_high")
    assert gain.basis == "seeds x test images" and gain.mean == pytest.approx(0.04)
    diff = rows.paired("attmask_high", "random", KNN_TOP1)
    assert diff.basis == "seeds x test images" and diff.mean == pytest.approx(0.02)
    seeds_alone = paired_difference([0.44, 0.441, 0.442], [0.42, 0.421, 0.422])
    assert seeds_alone.high - seeds_alone.low < 1e-9 < diff.high - diff.low
    assert "over seeds and the shared test images" in takeaways(rows, STRATEGIES)[0]
