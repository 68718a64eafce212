"""Deciding a paired comparison by adding seeds until it is decided, with a stated error rate.

Looking at a fixed-n 95 % interval after every new seed and stopping once it excludes 0
declares far more than 5 % of null comparisons "different": each look is another chance. Here
every look uses a Student-t interval at level ``1 - alpha / K``, where ``K`` is the number of
looks the plan allows (one after each seed from ``min_seeds`` to ``max_seeds``). By the union
bound the probability that *any* look's interval misses the true mean difference is at most
``alpha``, so a "better" or "worse" verdict on a null comparison, or an "equivalent" verdict on
a difference larger than the margin, happens with probability at most ``alpha`` however the
looks are used. This is the Bonferroni form of alpha spending for group-sequential designs
(Jennison & Turnbull, *Group Sequential Methods with Applications to Clinical Trials*, 2000,
ch. 2 and 7): more conservative than Pocock's or O'Brien-Fleming's boundaries, but valid for
any number of looks and for intervals, not only tests. ``tests/test_sequential.py`` checks the
error rate by simulation.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Sequence

from scipy import stats

VERDICTS = ("better", "worse", "equivalent", "undecided")


@dataclass(frozen=True)
class SequentialPlan:
    """A comparison decided within ``margin`` points, on ``min_seeds`` to ``max_seeds`` seeds."""
    margin: float = 1.0
    min_seeds: int = 2
    max_seeds: int = 10
    alpha: float = 0.05

    def __post_init__(self) -> None:
        if not self.margin > 0:
            raise ValueError(f"margin={self.margin}: must be > 0")
        if not 2 <= self.min_seeds <= self.max_seeds:
            raise ValueError(f"seeds {self.min_seeds}-{self.max_seeds}: need 2 <= min <= max")
        if not 0 < self.alpha < 1:
            raise ValueError(f"alpha={self.alpha}: must be in (0, 1)")

    @property
    def looks(self) -> int:
        return self.max_seeds - self.min_seeds + 1

    @property
    def level(self) -> float:
        """The confidence level of every look's interval."""
        return 1 - self.alpha / self.looks


@dataclass(frozen=True)
class Decision:
    verdict: str  # one of VERDICTS
    seeds: int
    mean: float
    low: float
    high: float
    reason: str
    more: bool = False  # the plan adds a seed


def interval(differences: Sequence[float], level: float, sd_floor: float = 0.0
             ) -> tuple[float, float, float]:
    """(mean, low, high): the Student-t interval of the mean of paired differences, with their
    standard deviation taken as at least ``sd_floor``."""
    n = len(differences)
    mean = sum(differences) / n
    sd = max(sd_floor, math.sqrt(sum((d - mean) ** 2 for d in differences) / (n - 1)))
    half = _t_quantile(0.5 + level / 2, n - 1) * sd / math.sqrt(n)
    return mean, mean - half, mean + half


@functools.lru_cache(maxsize=256)
def _t_quantile(q: float, df: int) -> float:
    return float(stats.t.ppf(q, df))


def decide(differences: Sequence[float], plan: SequentialPlan, sd_floor: float = 0.0
           ) -> Decision:
    """The decision after the seeds so far (per-seed paired differences, in points).

    ``sd_floor``: the spread a seed's difference has at least, from its test images' sampling
    error alone (the benchmark passes the root mean square of the per-seed standard errors):
    a few seeds that happen to agree must not make an interval narrower than the test set
    allows. Differences that do not vary at all decide nothing.

    Stops with "better" / "worse" once the interval excludes 0, with "equivalent" once it lies
    within +-margin; otherwise adds a seed, until ``max_seeds`` are spent ("undecided").
    """
    n = len(differences)
    if n < plan.min_seeds:
        return Decision("undecided", n, math.nan, math.nan, math.nan,
                        f"needs {plan.min_seeds} seeds before the first look", more=True)
    if sd_floor == 0 and len(set(differences)) == 1:  # a zero-width interval is no evidence
        return Decision("undecided", n, differences[0], math.nan, math.nan,
                        "the seeds' differences are identical: no spread to measure"
                        if n < plan.max_seeds else f"seed budget ({plan.max_seeds}) spent",
                        more=n < plan.max_seeds)
    mean, low, high = interval(differences, plan.level, sd_floor)
    if low > 0:
        return Decision("better", n, mean, low, high, "interval above 0")
    if high < 0:
        return Decision("worse", n, mean, low, high, "interval below 0")
    if -plan.margin <= low and high <= plan.margin:
        return Decision("equivalent", n, mean, low, high,
                        f"interval within +-{plan.margin:g}")
    if n >= plan.max_seeds:
        return Decision("undecided", n, mean, low, high,
                        f"seed budget ({plan.max_seeds}) spent")
    return Decision("undecided", n, mean, low, high, "interval wider than the margin",
                    more=True)
