"""Paired differences over training seeds, with a Student-t interval (issue 11: "several seeds, with intervals").

Two chains distilled from one teacher with the same seed draw the same training images, time steps and noise
(sferd.methods.draws: drawn per global sample from the stage's seed), and their FID sample sets use the same sample
seeds, so their FIDs on one seed are correlated. Comparing them seed by seed (d_i = method_i − baseline_i) removes what the seeds share; the spread of
the d_i is what is left to judge the difference by. The interval is the textbook one for a mean of n independent
differences: mean ± t_{1−α/2, n−1} · s/√n, s the sample standard deviation (n − 1) of the d_i.

Pure and small: the table renderer (sferd.report.table) gathers the per-seed values and formats the result.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

CONFIDENCE = 0.95  # two-sided; the conventional level, stated in every table that shows an interval


def t_quantile(p: float, df: int) -> float:
    """The p-quantile of Student's t distribution with `df` degrees of freedom."""
    if not 0.0 < p < 1.0 or df < 1:
        raise ValueError(f"t quantile needs 0 < p < 1 and df >= 1, got p={p}, df={df}")
    # scipy (a scikit-learn dependency, declared in pyproject) has the exact inverse of the regularised incomplete
    # beta function; imported here so that the table module stays light for `sferd-spec validate`
    from scipy.stats import t

    return float(t.ppf(p, df))


@dataclass(frozen=True)
class PairedDifference:
    """method − baseline over the seeds both were planned for.

    `seeds` are all planned seeds (sorted); `measured` those where both values exist. Unless every planned seed is
    measured, no statistic is given (a mean over the seeds that happen to be done would hide the missing ones, as
    the table's own cells do). With one measured seed there is a mean but no interval."""

    seeds: tuple[int, ...]
    measured: tuple[int, ...]
    differences: tuple[float, ...]  # per measured seed, in the order of `measured`
    confidence: float
    mean: float | None = None
    std: float | None = None  # sample standard deviation (n − 1) of the differences
    t: float | None = None  # t_{(1+confidence)/2, n−1}
    low: float | None = None
    high: float | None = None

    @property
    def complete(self) -> bool:
        return len(self.measured) == len(self.seeds) and bool(self.seeds)

    @property
    def n(self) -> int:
        return len(self.measured)

    @property
    def excludes_zero(self) -> bool | None:
        """True when the interval lies wholly above or below 0 (a difference distinguishable from none at this
        confidence); None when there is no interval."""
        if self.low is None or self.high is None:
            return None
        return self.low > 0.0 or self.high < 0.0


def paired_difference(method: Mapping[int, float | None], baseline: Mapping[int, float | None], *,
                      confidence: float = CONFIDENCE) -> PairedDifference:
    """The paired difference method − baseline, seed by seed.

    `method` and `baseline` map a seed to its measured value (None: planned, not measured). Values are paired by
    seed, never by position; a seed planned for only one of the two counts as missing for the pair."""
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    seeds = tuple(sorted(set(method) | set(baseline)))
    measured = tuple(s for s in seeds if method.get(s) is not None and baseline.get(s) is not None)
    diffs = tuple(float(method[s]) - float(baseline[s]) for s in measured)  # type: ignore[arg-type]
    out = PairedDifference(seeds=seeds, measured=measured, differences=diffs, confidence=confidence)
    if not out.complete:
        return out
    n = len(diffs)
    mean = math.fsum(diffs) / n
    if n < 2:
        return PairedDifference(seeds=seeds, measured=measured, differences=diffs, confidence=confidence, mean=mean)
    std = math.sqrt(math.fsum((d - mean) ** 2 for d in diffs) / (n - 1))
    t = t_quantile(0.5 + confidence / 2.0, n - 1)
    half = t * std / math.sqrt(n)
    return PairedDifference(seeds=seeds, measured=measured, differences=diffs, confidence=confidence,
                            mean=mean, std=std, t=t, low=mean - half, high=mean + half)
