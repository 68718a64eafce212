"""Paired comparison of two arms over seeds (``../shared/reference/measuring.md``).

For one seed both arms start from the same weights and see the same samples, so the per-seed
difference (arm minus reference) cancels most of the seed's luck. The mean difference gets a
Student-t interval on those differences with n - 1 degrees of freedom; an interval that contains
0 means "not distinguishable at this budget", whatever the sign of the mean.

A single run against its own untrained network (same seed, same test images) has no seed
spread to use; :func:`proportion_difference` then bounds the difference of two accuracies by the
test set's sampling error alone, which is all one run can say.
"""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Optional, Sequence

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
    half = t_quantile(confidence, len(diffs) - 1) * statistics.stdev(diffs) / math.sqrt(len(diffs))
    return PairedDifference(len(diffs), mean, mean - half, mean + half, statistics.stdev(diffs))


def proportion_difference(arm: float, reference: float, n: int, confidence: float = 0.95
                          ) -> PairedDifference:
    """Difference of two accuracies measured on the same ``n`` test images, with the normal
    interval of two independent proportions: conservative here, since the two are measured on
    the same images and their errors are positively correlated."""
    if n < 1:
        raise ValueError(f"n={n}: need at least one test image")
    from scipy.stats import norm

    z = float(norm.ppf(0.5 + confidence / 2))
    half = z * math.sqrt((arm * (1 - arm) + reference * (1 - reference)) / n)
    diff = arm - reference
    return PairedDifference(1, diff, diff - half, diff + half, basis="test images")


def seeds_for_half_width(diffs_std: float, target: float, confidence: float = 0.95,
                         max_seeds: int = 1000) -> Optional[int]:
    """Smallest number of seeds whose interval half-width reaches ``target`` for a per-seed
    difference spread ``diffs_std`` (None if more than ``max_seeds``)."""
    for n in range(2, max_seeds + 1):
        if t_quantile(confidence, n - 1) * diffs_std / math.sqrt(n) <= target:
            return n
    return None
