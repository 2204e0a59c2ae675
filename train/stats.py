"""Intervals over seeds: Student-t confidence intervals for a mean and for a difference of means.

The t quantile is computed here (regularised incomplete beta by its continued fraction, then
bisection on the CDF) so that the report needs nothing beyond the project's dependencies; the
tests hold it against tabulated values and, where installed, scipy.
"""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz)."""
    tiny, qab, qap, qam = 1e-300, a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 300):
        m2 = 2 * m
        for num in (m * (b - m) * x / ((qam + m2) * (a + m2)), -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return h


def betainc(a: float, b: float, x: float) -> float:
    """Regularised incomplete beta I_x(a, b) for x in [0, 1]."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def t_cdf(x: float, df: float) -> float:
    tail = 0.5 * betainc(df / 2.0, 0.5, df / (df + x * x))
    return 1.0 - tail if x >= 0 else tail


def t_quantile(p: float, df: float) -> float:
    """The x with P(T ≤ x) = p for Student's t with `df` degrees of freedom (df > 0, 0 < p < 1)."""
    if not (0.0 < p < 1.0 and df > 0):
        raise ValueError(f"t_quantile needs 0 < p < 1 and df > 0, got p={p}, df={df}")
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < p:
        hi *= 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if t_cdf(mid, df) < p else (lo, mid)
        if hi - lo < 1e-12 * max(1.0, hi):
            break
    return 0.5 * (lo + hi)


@dataclass
class Interval:
    """A mean over n samples, their standard deviation and a two-sided confidence interval
    (lo, hi are None with fewer than two samples: one seed gives no interval)."""
    mean: float
    std: float | None
    lo: float | None
    hi: float | None
    n: int

    def as_dict(self) -> dict:
        return {"mean": self.mean, "std": self.std, "ci95": [self.lo, self.hi] if self.lo is not None else None,
                "n": self.n}


def mean_interval(xs: list[float], level: float = 0.95) -> Interval | None:
    """Mean ± t_{(1+level)/2, n-1} · s/√n; None for no samples."""
    n = len(xs)
    if n == 0:
        return None
    mean = statistics.fmean(xs)
    if n == 1:
        return Interval(mean, None, None, None, 1)
    std = statistics.stdev(xs)
    half = t_quantile((1 + level) / 2, n - 1) * std / math.sqrt(n)
    return Interval(mean, std, mean - half, mean + half, n)


def difference_interval(a: list[float], b: list[float], level: float = 0.95) -> Interval | None:
    """mean(a) − mean(b) with Welch's interval (unequal variances, Welch–Satterthwaite degrees of
    freedom); the interval is None unless both sides have two samples or more, and not all equal."""
    if not a or not b:
        return None
    diff = statistics.fmean(a) - statistics.fmean(b)
    if len(a) < 2 or len(b) < 2:
        return Interval(diff, None, None, None, min(len(a), len(b)))
    va, vb = statistics.variance(a) / len(a), statistics.variance(b) / len(b)
    se = math.sqrt(va + vb)
    if se == 0.0:  # no seed moved the result: a t interval would claim certainty it has no evidence for
        return Interval(diff, 0.0, None, None, min(len(a), len(b)))
    df = (va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1))
    half = t_quantile((1 + level) / 2, df) * se
    return Interval(diff, se, diff - half, diff + half, min(len(a), len(b)))
