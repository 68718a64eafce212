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
        return None if self.low is None else (self.high - self.low) / 2

    @property
    def verdict(self) -> str:
        if self.low is None:
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
    """Mean of ``arm[i] - reference[i]`` over seeds with its ``confidence`` interval."""
    if len(arm) != len(reference):
        raise ValueError(f"paired samples differ in length: {len(arm)} vs {len(reference)}")
    if not arm:
        raise ValueError("no paired samples")
    diffs = [a - b for a, b in zip(arm, reference)]
    mean = statistics.fmean(diffs)
    if len(diffs) < 2:
        return PairedDifference(1, mean, None, None)
    se = statistics.stdev(diffs) / math.sqrt(len(diffs))
    half = t_quantile(confidence, len(diffs) - 1) * se
    return PairedDifference(len(diffs), mean, mean - half, mean + half, statistics.stdev(diffs),
                            se=se)


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
                       math.sqrt(statistics.fmean([d.se ** 2 for d in per_seed])))


def seeds_for_half_width(diffs_std: float, target: float, confidence: float = 0.95,
                         max_seeds: int = 1000) -> Optional[int]:
    """Smallest number of seeds whose interval half-width reaches ``target`` for a per-seed
    difference spread ``diffs_std`` (None if more than ``max_seeds``)."""
    for n in range(2, max_seeds + 1):
        if t_quantile(confidence, n - 1) * diffs_std / math.sqrt(n) <= target:
            return n
    return None


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
