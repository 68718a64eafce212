"""Paired comparison of two arms over seeds (``../shared/reference/measuring.md``).

For one seed both arms start from the same weights and see the same samples, so the per-seed
difference (arm minus reference) cancels most of the seed's luck. The mean difference gets a
Student-t interval on those differences with n - 1 degrees of freedom; an interval that contains
0 means "not distinguishable at this budget", whatever the sign of the mean.

Within one seed, :func:`paired_hits` compares two models image by image on the same test
images: its interval holds both trained networks fixed and measures the test set's sampling
error alone. :func:`split_spread` then tells how much of the seed-to-seed spread that sampling
explains, so a reader knows whether more seeds or more test images would narrow a comparison.
Results that lack per-image hits fall back to :func:`proportion_difference`, which bounds the
difference of two accuracies on the same images as if they were independent.

Seeds that share one test set share its sampling error: an interval over seeds alone leaves it
out (every seed gains on the same easy images). :func:`two_way_difference` models each per-image
difference as ``mu + seed effect + image effect + residual`` (a crossed random-effects design,
balanced: every seed on every image) and gives the mean its variance from both factors,
``sigma_seed^2 / S + sigma_image^2 / N + sigma_residual^2 / (S N)``, estimated from the two-way
ANOVA mean squares, with a Satterthwaite Student-t (Searle, Casella & McCulloch, *Variance
Components*, 1992, ch. 4; Satterthwaite, Biometrics Bulletin 2, 1946).
"""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

NOT_DISTINGUISHABLE = "not distinguishable at this budget"
ONE_SEED = "one seed: no interval"


@dataclass(frozen=True)
class PairedDifference:
    n: int  # number of seeds with both arms
    mean: float
    low: Optional[float]  # None with fewer than 2 seeds
    high: Optional[float]
    std: Optional[float] = None  # of the per-seed differences
    basis: str = "seeds"  # what the interval measures: "seeds" or "test images"
    se: Optional[float] = None  # standard error of the mean difference

    @property
    def half_width(self) -> Optional[float]:
        return None if self.low is None or self.high is None else (self.high - self.low) / 2

    @property
    def verdict(self) -> str:
        if self.low is None or self.high is None:
            return ONE_SEED
        if self.low > 0:
            return "better"
        if self.high < 0:
            return "worse"
        return NOT_DISTINGUISHABLE


def t_quantile(confidence: float, df: int) -> float:
    """Two-sided Student-t critical value, e.g. 4.303 for 95 % and 2 degrees of freedom."""
    from scipy.stats import t

    return float(t.ppf(0.5 + confidence / 2, df))


def paired_difference(arm: Sequence[float], reference: Sequence[float],
                      confidence: float = 0.95) -> PairedDifference:
    """Mean of ``arm[i] - reference[i]`` over seeds with its ``confidence`` interval (scipy's
    paired t-test: Student t on the differences, n - 1 degrees of freedom)."""
    from scipy.stats import ttest_rel

    if len(arm) != len(reference):
        raise ValueError(f"paired samples differ in length: {len(arm)} vs {len(reference)}")
    if not arm:
        raise ValueError("no paired samples")
    diffs = [a - b for a, b in zip(arm, reference)]
    mean = statistics.fmean(diffs)
    if len(diffs) < 2:
        return PairedDifference(1, mean, None, None)
    std = statistics.stdev(diffs)
    if std == 0:  # scipy returns nan for identical differences; the interval is the point
        return PairedDifference(len(diffs), mean, mean, mean, 0.0, se=0.0)
    ci = ttest_rel(arm, reference).confidence_interval(confidence)
    return PairedDifference(len(diffs), mean, float(ci.low), float(ci.high), std,
                            se=std / math.sqrt(len(diffs)))


def two_way_difference(diffs: np.ndarray, confidence: float = 0.95) -> PairedDifference:
    """Mean of per-image differences ``diffs[seed, image]`` (S seeds on the same N test
    images) with an interval that counts both the seeds' and the shared test images' sampling
    error (module docstring). ``basis`` is ``"seeds x test images"``; ``std`` is that of the
    per-seed means, as for :func:`paired_difference`."""
    from scipy.stats import t

    d = np.asarray(diffs, dtype=float)
    if d.ndim != 2 or d.shape[0] < 2 or d.shape[1] < 2:
        raise ValueError(f"diffs of shape {d.shape}: need (seeds >= 2, images >= 2)")
    S, N = d.shape
    grand, by_seed, by_image = d.mean(), d.mean(axis=1), d.mean(axis=0)
    ms_seed = N * ((by_seed - grand) ** 2).sum() / (S - 1)
    ms_image = S * ((by_image - grand) ** 2).sum() / (N - 1)
    resid = d - by_seed[:, None] - by_image[None, :] + grand
    ms_resid = (resid ** 2).sum() / ((S - 1) * (N - 1))
    # E[ms_seed] = N s_a^2 + s_e^2, E[ms_image] = S s_b^2 + s_e^2, E[ms_resid] = s_e^2
    terms = [(ms_seed, S - 1), (ms_image, N - 1), (-ms_resid, (S - 1) * (N - 1))]
    total = sum(ms for ms, _ in terms)
    floor = max(ms_seed, ms_image, ms_resid)  # a negative variance estimate is no estimate
    if total < floor / 2:
        total, terms = floor, [(floor, S - 1)]
    var = total / (S * N)
    df = total ** 2 / sum(ms ** 2 / dof for ms, dof in terms) if total > 0 else S - 1
    se = math.sqrt(var)
    half = float(t.ppf(0.5 + confidence / 2, max(df, 1.0))) * se
    mean = float(grand)
    return PairedDifference(S, mean, mean - half, mean + half, float(by_seed.std(ddof=1)),
                            basis="seeds x test images", se=se)


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjustment (Holm, Scand. J. Statistics 6, 1979): adjusted p-values in
    the input order; reject where adjusted p < alpha, with the family-wise error at alpha."""
    order = sorted(range(len(p_values)), key=lambda i: p_values[i])
    adjusted, running = [0.0] * len(p_values), 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(p_values) - rank) * p_values[i]))
        adjusted[i] = running
    return adjusted


def normal_p(d: PairedDifference) -> float:
    """Two-sided p-value of one difference measured on the test images (normal)."""
    from scipy.stats import norm

    if not d.se:
        return 0.0 if d.mean else 1.0
    return float(2 * norm.sf(abs(d.mean) / d.se))


def cochran_q(per_seed: Sequence[PairedDifference]) -> tuple[float, float]:
    """Cochran's Q test that the per-seed differences share one true value (Cochran,
    Biometrics 10, 1954): (Q, p-value) with S - 1 degrees of freedom, inverse-variance weights."""
    from scipy.stats import chi2

    if len(per_seed) < 2 or any(not d.se for d in per_seed):
        raise ValueError("need two or more per-seed differences with standard errors")
    w = np.array([1 / d.se ** 2 for d in per_seed if d.se])
    x = np.array([d.mean for d in per_seed])
    q = float((w * (x - (w * x).sum() / w.sum()) ** 2).sum())
    return q, float(chi2.sf(q, len(per_seed) - 1))


def _z(confidence: float) -> float:
    from scipy.stats import norm

    return float(norm.ppf(0.5 + confidence / 2))


def paired_hits(arm: Sequence[bool], reference: Sequence[bool], confidence: float = 0.95
                ) -> PairedDifference:
    """Accuracy of ``arm`` minus ``reference`` on the same test images, from the per-image
    differences (each -1, 0 or +1), with a normal interval. Narrower than
    :func:`proportion_difference` because two models are right on many of the same images."""
    a, b = np.asarray(arm, dtype=float), np.asarray(reference, dtype=float)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"paired hits differ in shape: {a.shape} vs {b.shape}")
    if len(a) < 2:
        raise ValueError(f"n={len(a)}: need at least two test images")
    diffs = a - b
    mean, se = float(diffs.mean()), float(diffs.std(ddof=1) / math.sqrt(len(diffs)))
    half = _z(confidence) * se
    return PairedDifference(1, mean, mean - half, mean + half, basis="test images", se=se)


def proportion_difference(arm: float, reference: float, n: int, confidence: float = 0.95
                          ) -> PairedDifference:
    """Difference of two accuracies measured on the same ``n`` test images, with the normal
    interval of two independent proportions: conservative here, since the two are measured on
    the same images and their errors are positively correlated."""
    if n < 1:
        raise ValueError(f"n={n}: need at least one test image")
    se = math.sqrt((arm * (1 - arm) + reference * (1 - reference)) / n)
    half = _z(confidence) * se
    diff = arm - reference
    return PairedDifference(1, diff, diff - half, diff + half, basis="test images", se=se)


@dataclass(frozen=True)
class SpreadSplit:
    """The seed-to-seed spread of paired differences, and the part of it the test images'
    sampling explains (variances add: total^2 = test_images^2 + training^2)."""

    total: float  # standard deviation of the per-seed differences
    test_images: float  # root mean square of the per-seed standard errors

    @property
    def training(self) -> float:
        """The rest: how each seed's training runs went, which only more seeds average out."""
        return math.sqrt(max(self.total ** 2 - self.test_images ** 2, 0.0))


def split_spread(per_seed: Sequence[PairedDifference]) -> SpreadSplit:
    """Split the spread of per-seed differences measured on the test images (:func:`paired_hits`)."""
    if len(per_seed) < 2 or any(d.se is None for d in per_seed):
        raise ValueError("need two or more per-seed differences with standard errors")
    return SpreadSplit(statistics.stdev([d.mean for d in per_seed]),
                       math.sqrt(statistics.fmean([d.se ** 2 for d in per_seed
                                                   if d.se is not None])))


def seeds_for_half_width(diffs_std: float, target: float, confidence: float = 0.95,
                         max_seeds: int = 1000) -> Optional[int]:
    """Smallest number of seeds whose interval half-width reaches ``target`` for a per-seed
    difference spread ``diffs_std`` (None if more than ``max_seeds``)."""
    for n in range(2, max_seeds + 1):
        if t_quantile(confidence, n - 1) * diffs_std / math.sqrt(n) <= target:
            return n
    return None


def seeds_for_half_width_range(diffs_std: float, n: int, target: float,
                               confidence: float = 0.95, max_seeds: int = 1000
                               ) -> tuple[Optional[int], Optional[int], Optional[int]]:
    """Seeds needed for ``target``, as an estimate: (at the observed spread, at the low and at
    the high end of that spread's 95 % chi-square interval from ``n`` seeds). None: more than
    ``max_seeds``."""
    from scipy.stats import chi2

    if n < 2:
        raise ValueError(f"n={n}: a spread needs two or more seeds")
    low = diffs_std * math.sqrt((n - 1) / chi2.ppf(0.975, n - 1))
    high = diffs_std * math.sqrt((n - 1) / chi2.ppf(0.025, n - 1))
    at, at_low, at_high = (seeds_for_half_width(s, target, confidence, max_seeds)
                           for s in (diffs_std, low, high))
    return at, at_low, at_high


def images_for_half_width(split: SpreadSplit, seeds: int, images: int, target: float,
                          confidence: float = 0.95) -> Optional[int]:
    """Test images that would bring the interval over ``seeds`` seeds to ``target`` (the seeds
    fixed, the test images' share of the variance shrinking as 1 / images); None where the
    training spread alone keeps it wider."""
    if seeds < 2:
        raise ValueError(f"seeds={seeds}: an interval over seeds needs two or more")
    room = (target * math.sqrt(seeds) / t_quantile(confidence, seeds - 1)) ** 2 \
        - split.training ** 2
    if room <= 0:
        return None
    return max(1, math.ceil(split.test_images ** 2 * images / room))
