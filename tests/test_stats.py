"""Paired statistics: known differences give the known interval and verdict."""
import math

import numpy as np
import pytest

from attmask.eval.stats import (
    NOT_DISTINGUISHABLE,
    ONE_SEED,
    PairedDifference,
    SpreadSplit,
    cochran_q,
    holm,
    images_for_half_width,
    paired_difference,
    paired_hits,
    proportion_difference,
    seeds_for_half_width,
    seeds_for_half_width_range,
    split_spread,
    t_quantile,
    two_way_difference,
)


def test_t_quantiles_match_the_table():
    # measuring.md: t = 4.30 for 3 seeds, 2.78 for 5, 2.26 for 10 (95 %, n - 1 dof)
    assert t_quantile(0.95, 2) == pytest.approx(4.303, abs=1e-3)
    assert t_quantile(0.95, 4) == pytest.approx(2.776, abs=1e-3)
    assert t_quantile(0.95, 9) == pytest.approx(2.262, abs=1e-3)


def test_known_differences_give_the_known_interval():
    # differences 1, 2, 3: mean 2, std 1, half-width 4.303 / sqrt(3)
    d = paired_difference([0.51, 0.42, 0.73], [0.50, 0.40, 0.70])
    half = 4.302653 * 0.01 / math.sqrt(3)
    assert d.n == 3 and d.mean == pytest.approx(0.02)
    assert d.low == pytest.approx(0.02 - half, abs=1e-6) and d.high == pytest.approx(0.02 + half,
                                                                                    abs=1e-6)
    assert d.verdict == NOT_DISTINGUISHABLE  # the interval [-0.5, 4.5] points contains 0


def test_verdicts_follow_the_interval_not_the_mean():
    assert paired_difference([0.6, 0.61, 0.62], [0.5, 0.5, 0.5]).verdict == "better"
    assert paired_difference([0.4, 0.41, 0.39], [0.5, 0.5, 0.5]).verdict == "worse"
    # a large mean with a huge spread is still not distinguishable
    assert paired_difference([0.9, 0.1, 0.9], [0.5, 0.5, 0.5]).verdict == NOT_DISTINGUISHABLE
    one = paired_difference([0.6], [0.5])
    assert one.verdict == ONE_SEED and one.low is None and one.mean == pytest.approx(0.1)


def test_pairing_is_what_makes_the_difference():
    # seeds move both arms together: unpaired the arms overlap, paired the gain is clear
    ref = [0.30, 0.40, 0.50, 0.60]
    arm = [r + 0.02 + e for r, e in zip(ref, (0.001, -0.001, 0.002, -0.002))]
    assert paired_difference(arm, ref).verdict == "better"


def test_input_errors_and_seed_planning():
    with pytest.raises(ValueError, match="differ in length"):
        paired_difference([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="no paired samples"):
        paired_difference([], [])
    n = seeds_for_half_width(0.02, 0.015)
    assert t_quantile(0.95, n - 1) * 0.02 / math.sqrt(n) <= 0.015
    assert t_quantile(0.95, n - 2) * 0.02 / math.sqrt(n - 1) > 0.015
    assert seeds_for_half_width(1.0, 1e-4, max_seeds=10) is None


def test_one_run_against_its_init_uses_the_test_images_sampling_error():
    # 40 % vs 30 % on 1,000 images: half-width 1.96 * sqrt((0.24 + 0.21) / 1000) = 4.16 points
    d = proportion_difference(0.40, 0.30, 1000)
    assert d.mean == pytest.approx(0.10) and d.basis == "test images"
    assert d.high - d.mean == pytest.approx(1.959964 * math.sqrt(0.45 / 1000), abs=1e-6)
    assert d.verdict == "better"
    # one point on 1,000 images is within the noise; the same point on 100,000 is not
    assert proportion_difference(0.31, 0.30, 1000).verdict == NOT_DISTINGUISHABLE
    assert proportion_difference(0.31, 0.30, 100_000).verdict == "better"
    assert proportion_difference(0.25, 0.30, 10_000).verdict == "worse"
    with pytest.raises(ValueError, match="n=0"):
        proportion_difference(0.5, 0.5, 0)


def test_image_by_image_differences_give_the_known_interval():
    # on 1,000 images the arm alone is right on 60, the reference alone on 20, both on 300
    arm = np.zeros(1000, bool)
    ref = np.zeros(1000, bool)
    arm[:60] = True
    ref[60:80] = True
    arm[100:400] = ref[100:400] = True
    d = paired_hits(arm, ref)
    diffs = np.r_[np.ones(60), -np.ones(20), np.zeros(920)]
    se = diffs.std(ddof=1) / math.sqrt(1000)
    assert d.mean == pytest.approx(0.04) and d.se == pytest.approx(se)
    assert d.high - d.mean == pytest.approx(1.959964 * se, abs=1e-6)
    assert d.basis == "test images" and d.verdict == "better"
    # the same accuracies as if measured on unrelated images: a wider interval
    unpaired = proportion_difference(0.36, 0.32, 1000)
    assert unpaired.high - unpaired.low > 2 * (d.high - d.low)
    with pytest.raises(ValueError, match="differ in shape"):
        paired_hits(arm, ref[:-1])


def test_the_spread_over_seeds_splits_into_test_images_and_training():
    per_seed = [paired_hits(*pair) for pair in (
        (np.r_[np.ones(30), np.zeros(970)], np.zeros(1000)),   # +3.0 points
        (np.r_[np.zeros(20), np.zeros(980)], np.r_[np.ones(10), np.zeros(990)]))]  # -1.0
    split = split_spread(per_seed)
    assert split.total == pytest.approx(np.std([0.03, -0.01], ddof=1))
    assert split.test_images == pytest.approx(math.sqrt((per_seed[0].se ** 2
                                                         + per_seed[1].se ** 2) / 2))
    assert split.training == pytest.approx(math.sqrt(split.total ** 2 - split.test_images ** 2))
    assert SpreadSplit(0.01, 0.02).training == 0.0  # the test images explain it all
    with pytest.raises(ValueError, match="two or more"):
        split_spread(per_seed[:1])


def test_test_images_needed_with_the_seeds_fixed():
    # no training spread: the 3-seed half-width is t(2) * test / sqrt(3) at 1,000 images, and
    # shrinks as 1 / sqrt(images)
    split = SpreadSplit(0.02, 0.02)
    images = images_for_half_width(split, 3, 1000, 0.015)
    half = lambda n: t_quantile(0.95, 2) * 0.02 * math.sqrt(1000 / n) / math.sqrt(3)  # noqa: E731
    assert half(images) <= 0.015 < half(images - 1)
    # a training spread whose own interval is wider than the goal: no test set is enough
    assert images_for_half_width(SpreadSplit(0.03, 0.005), 3, 1000, 0.015) is None
    with pytest.raises(ValueError, match="seeds=1"):
        images_for_half_width(split, 1, 1000, 0.015)


def simulated_coverage(S, N, seed_sd, image_sd, resid_sd, repeats=300, mu=0.02):
    """Share of repeats whose interval covers the true gain ``mu``: two-way, and over seeds
    alone. The test images are drawn once per repeat and shared by every seed, as in a
    benchmark."""
    rng = np.random.default_rng(0)
    two = one = 0
    for _ in range(repeats):
        d = (mu + rng.normal(0, seed_sd, S)[:, None] + rng.normal(0, image_sd, N)[None, :]
             + rng.normal(0, resid_sd, (S, N)))
        a, b = two_way_difference(d), paired_difference(list(d.mean(1)), [0.0] * S)
        two += a.low <= mu <= a.high
        one += b.low <= mu <= b.high
    return two / repeats, one / repeats


def test_the_two_way_interval_covers_the_true_gain_where_seeds_alone_do_not():
    """Seeds that share one test set share its sampling error: per-image gains correlated
    across seeds (0.69 here) make the interval over seeds alone miss the true gain half the
    time; the two-way interval covers it about 95 % of the time."""
    two, one = simulated_coverage(S=5, N=2000, seed_sd=0.002, image_sd=0.3, resid_sd=0.2)
    assert 0.92 <= two <= 0.98 and one < 0.7
    # where the seeds dominate, both hold their level
    two, one = simulated_coverage(S=5, N=2000, seed_sd=0.02, image_sd=0.2, resid_sd=0.3)
    assert 0.92 <= two <= 0.98 and 0.9 <= one


def test_two_way_known_values():
    d = np.array([[1.0, 0.0, 1.0, 0.0], [1.0, 1.0, 0.0, 0.0]])
    result = two_way_difference(d)
    assert result.mean == pytest.approx(0.5) and result.basis == "seeds x test images"
    with pytest.raises(ValueError):
        two_way_difference(d[:1])


def test_holm_and_cochran_q_known_values():
    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert holm([0.5, 0.001]) == pytest.approx([0.5, 0.002])
    same = [paired_hits([True] * 60 + [False] * 40, [True] * 50 + [False] * 50)] * 3
    q, p = cochran_q(same)
    assert q == pytest.approx(0.0) and p == pytest.approx(1.0)
    apart = [PairedDifference(1, 0.05, 0.03, 0.07, se=0.01),
             PairedDifference(1, -0.05, -0.07, -0.03, se=0.01)]
    q, p = cochran_q(apart)
    assert q == pytest.approx(50.0) and p < 1e-6  # (0.05 / 0.01)^2 * 2


def test_seeds_needed_is_an_estimate_with_a_range():
    at, low, high = seeds_for_half_width_range(0.01, 3, 0.015)
    assert at == seeds_for_half_width(0.01, 0.015) == 5
    assert low < at < high
    at6, low6, high6 = seeds_for_half_width_range(0.01, 30, 0.015)
    assert high6 - low6 < high - low  # more seeds, a tighter estimate
