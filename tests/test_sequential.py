"""The sequential rule's error rate, by simulation: many repeats of comparisons whose true
difference is known, each run the way the benchmark runs it (a look after every seed)."""
import numpy as np
import pytest

from attmask.eval.sequential import SequentialPlan, decide, interval

PLAN = SequentialPlan(margin=1.0, min_seeds=2, max_seeds=12, alpha=0.05)
REPEATS = 4000


def run(true_difference: float, sd: float, plan: SequentialPlan, rng) -> str:
    draws = true_difference + sd * rng.standard_normal(plan.max_seeds)
    for n in range(plan.min_seeds, plan.max_seeds + 1):
        decision = decide(list(draws[:n]), plan)
        if not decision.more:
            return decision.verdict
    raise AssertionError("the plan looked past its seed budget")


@pytest.mark.parametrize("sd", [0.8, 2.0, 4.0])
def test_a_null_comparison_is_called_different_at_most_alpha_of_the_time(sd):
    rng = np.random.default_rng(0)
    verdicts = [run(0.0, sd, PLAN, rng) for _ in range(REPEATS)]
    wrong = sum(v in ("better", "worse") for v in verdicts) / REPEATS
    assert wrong <= PLAN.alpha + 3 * np.sqrt(PLAN.alpha * (1 - PLAN.alpha) / REPEATS), wrong


def test_looking_after_every_seed_with_fixed_95_percent_intervals_is_what_it_prevents():
    """The naive rule (stop once a plain 95 % interval excludes 0) on the same null draws."""
    rng = np.random.default_rng(1)
    wrong = 0
    for _ in range(REPEATS):
        draws = 2.0 * rng.standard_normal(PLAN.max_seeds)
        for n in range(2, PLAN.max_seeds + 1):
            _, low, high = interval(list(draws[:n]), 0.95)
            if low > 0 or high < 0:
                wrong += 1
                break
    assert wrong / REPEATS > 0.12  # more than twice the stated 5 %


def test_a_difference_larger_than_the_margin_is_rarely_called_equivalent():
    rng = np.random.default_rng(2)
    verdicts = [run(1.3, 1.0, PLAN, rng) for _ in range(REPEATS)]
    assert verdicts.count("equivalent") / REPEATS <= PLAN.alpha


def test_a_real_difference_is_found_and_a_tiny_one_is_called_equivalent():
    rng = np.random.default_rng(3)
    found = [run(2.5, 1.0, PLAN, rng) for _ in range(500)]
    assert found.count("better") / 500 > 0.9
    tiny = [run(0.0, 0.3, PLAN, rng) for _ in range(500)]
    assert tiny.count("equivalent") / 500 > 0.9


def test_each_decision_says_why_it_stopped_or_goes_on():
    assert decide([0.5], PLAN).more  # too few seeds for a first look
    wide = decide([3.0, -3.0], PLAN)
    assert wide.more and wide.verdict == "undecided" and "wider" in wide.reason
    assert decide([2.0, 2.1, 1.9], PLAN).verdict == "better"
    assert decide([-2.0, -2.1, -1.9], PLAN).verdict == "worse"
    spent = decide([3.0, -3.0] * 6, PLAN)
    assert not spent.more and "budget" in spent.reason
    # the level of every look pays for all the looks the plan allows
    assert PLAN.looks == 11 and PLAN.level == pytest.approx(1 - 0.05 / 11)
    with pytest.raises(ValueError, match="margin"):
        SequentialPlan(margin=0)


def test_seeds_that_happen_to_agree_decide_nothing_and_the_test_set_bounds_the_spread():
    same = decide([0.0, 0.0, 0.0], PLAN)
    assert same.verdict == "undecided" and same.more and "identical" in same.reason
    assert not decide([0.0] * PLAN.max_seeds, PLAN).more
    # two seeds 0.1 apart look precise; their test images say each difference is +-1.5
    assert decide([0.0, 0.1, 0.05], PLAN).verdict == "equivalent"
    floored = decide([0.0, 0.1, 0.05], PLAN, sd_floor=1.5)
    assert floored.verdict == "undecided" and floored.high > 1.0
