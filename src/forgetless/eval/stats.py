"""Uncertainty for every number we report: standard errors, bootstrap CIs, paired differences.

A forgetting claim ("ARC dropped 2 points") is only meaningful next to its noise, so every
metric is a ``Metric`` carrying its standard error and a 95% interval, never a bare float.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import numpy as np

Z95 = 1.959963984540054


@dataclass(frozen=True)
class Metric:
    """A point estimate with its standard error, 95% interval and sample size."""

    value: float
    stderr: float
    ci_low: float
    ci_high: float
    n: int

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Metric:
        return cls(**{k: data[k] for k in ("value", "stderr", "ci_low", "ci_high", "n")})

    def __str__(self) -> str:
        return f"{self.value:.4f} ± {self.stderr:.4f} [{self.ci_low:.4f}, {self.ci_high:.4f}]"


def mean_metric(values: Sequence[float]) -> Metric:
    """Sample mean with its standard error (ddof=1, as lm-eval's ``mean_stderr``) and normal CI."""
    x = np.asarray(values, dtype=np.float64)
    n = len(x)
    if n == 0:
        return Metric(math.nan, math.nan, math.nan, math.nan, 0)
    value = float(x.mean())
    stderr = float(x.std(ddof=1) / math.sqrt(n)) if n > 1 else math.nan
    return _normal(value, stderr, n)


def proportion_metric(correct: Sequence[float]) -> Metric:
    """Share of 0/1 outcomes: lm-eval's standard error, and a Wilson score 95% interval, which
    stays inside [0, 1] and keeps its coverage at small n or near 0% / 100%."""
    m = mean_metric(correct)
    if m.n == 0:
        return m
    p, n, z2 = m.value, m.n, Z95**2
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = Z95 * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    return Metric(p, m.stderr, max(0.0, centre - half), min(1.0, centre + half), n)


def _normal(value: float, stderr: float, n: int) -> Metric:
    if math.isnan(stderr):
        return Metric(value, stderr, math.nan, math.nan, n)
    return Metric(value, stderr, value - Z95 * stderr, value + Z95 * stderr, n)


def bootstrap_metric(
    columns: Sequence[Sequence[float]],
    statistic: Callable[..., float],
    resamples: int = 2000,
    seed: int = 0,
) -> Metric:
    """Resample items (rows across ``columns``) to get SE and percentile 95% CI of ``statistic``.

    Used where the estimate is not a plain mean, e.g. token-weighted NLL (a ratio of sums).
    """
    arrays = [np.asarray(c, dtype=np.float64) for c in columns]
    n = len(arrays[0])
    if n == 0:
        return Metric(math.nan, math.nan, math.nan, math.nan, 0)
    value = float(statistic(*arrays))
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n, size=(resamples, n))
    stats = np.array([statistic(*(a[i] for a in arrays)) for i in idx], dtype=np.float64)
    low, high = np.percentile(stats, [2.5, 97.5])
    return Metric(value, float(stats.std(ddof=1)), float(low), float(high), n)


def combine_means(metrics: Sequence[Metric]) -> Metric:
    """Unweighted mean of independent metrics; SEs add in quadrature (e.g. suite-mean accuracy)."""
    if not metrics:
        return Metric(math.nan, math.nan, math.nan, math.nan, 0)
    k = len(metrics)
    value = sum(m.value for m in metrics) / k
    stderr = math.sqrt(sum(m.stderr**2 for m in metrics)) / k
    return _normal(value, stderr, sum(m.n for m in metrics))


def combine_intervals(metrics: Sequence[Metric]) -> Metric:
    """Unweighted mean of independent metrics whose interval is built from the tasks' own
    intervals (MOVER, Zou & Donner 2008: lower and upper half-widths added in quadrature, / k),
    so a suite average of Wilson intervals stays a Wilson-based interval: one task's average is
    that task's interval (not [p, p] at 0 %), and normal per-task intervals give the normal
    pooled one (as ``combine_means``). SEs add in quadrature as there."""
    if not metrics or any(math.isnan(m.ci_low) or math.isnan(m.ci_high) for m in metrics):
        return combine_means(metrics)
    k = len(metrics)
    value = sum(m.value for m in metrics) / k
    stderr = math.sqrt(sum(m.stderr**2 for m in metrics)) / k
    below = math.sqrt(sum((m.value - m.ci_low) ** 2 for m in metrics)) / k
    above = math.sqrt(sum((m.ci_high - m.value) ** 2 for m in metrics)) / k
    return Metric(value, stderr, value - below, value + above, sum(m.n for m in metrics))


def paired_bootstrap(
    before: Sequence[float], after: Sequence[float], resamples: int = 2000, seed: int = 0
) -> Metric:
    """Mean of ``after - before`` over the same items: paired SE (McNemar-style for 0/1 scores)
    and a paired-bootstrap percentile 95% CI.

    Pairing removes item difficulty from the noise, so a few-point drop on 300 items can be
    significant where two independent CIs would overlap.
    """
    d = np.asarray(after, dtype=np.float64) - np.asarray(before, dtype=np.float64)
    n = len(d)
    if n == 0:
        return Metric(math.nan, math.nan, math.nan, math.nan, 0)
    value = float(d.mean())
    stderr = float(d.std(ddof=1) / math.sqrt(n)) if n > 1 else math.nan
    rng = np.random.default_rng(seed)
    means = d[rng.integers(0, n, size=(resamples, n))].mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return Metric(value, stderr, float(low), float(high), n)


def two_level_bootstrap(
    differences: Sequence[np.ndarray], resamples: int = 2000, seed: int = 0
) -> Metric:
    """Mean paired change pooled over training seeds and items, with a CI for both sources.

    ``differences`` holds one ``seeds × items`` array per task (every seed scored the same
    items, so items are crossed with seeds); the estimate is the mean over tasks of the mean
    over seeds and items. Each resample draws the seeds with replacement, then the items of
    every task with replacement, the same items for every drawn seed (an item's difficulty is
    shared by all seeds, so it must not average out across them). With one seed this is the
    item bootstrap of ``paired_bootstrap``; with several, a change that one lucky data order
    carries widens the CI instead of hiding in an item-only CI. SE = the resamples' SD.
    """
    arrays = [np.atleast_2d(np.asarray(d, dtype=np.float64)) for d in differences]
    if not arrays or any(a.size == 0 for a in arrays):
        return Metric(math.nan, math.nan, math.nan, math.nan, 0)
    seeds = arrays[0].shape[0]
    if any(a.shape[0] != seeds for a in arrays):
        raise ValueError("every task needs the same seeds")
    value = float(np.mean([a.mean() for a in arrays]))
    rng = np.random.default_rng(seed)
    drawn = rng.integers(0, seeds, size=(resamples, seeds))
    stats = np.zeros(resamples)
    for a in arrays:
        items = rng.integers(0, a.shape[1], size=(resamples, a.shape[1]))
        # per resample: the mean over its drawn seeds of the mean over its drawn items
        per_seed = np.take_along_axis(a[drawn], items[:, None, :], axis=2).mean(axis=2)
        stats += per_seed.mean(axis=1)
    stats /= len(arrays)
    low, high = np.percentile(stats, [2.5, 97.5])
    return Metric(value, float(stats.std(ddof=1)), float(low), float(high),
                  sum(a.size for a in arrays))
