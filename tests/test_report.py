"""The report builder on hand-made run records: baselines first, gains over init, the paired
table with known numbers, and the takeaways a reader sees first."""
import math

import pytest

from pipelines.report import Rows, RunRecord, build_tables, paired_table, takeaways

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
    # spread 1 point per seed: n seeds with t(n-1) / sqrt(n) <= 1.5, i.e. 5 (2.776 / 2.236)
    assert knn[6] == "5"
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
    assert "60.0 ± 0.0 % of its masked patches lie on the object" in lines[2]
    assert "object share of 30.0 ± 0.0 %" in lines[2]


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
