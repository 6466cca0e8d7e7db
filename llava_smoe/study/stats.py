"""Small-sample statistics for comparing variants over seeds: Student's t intervals and paired tests.

With 3 seeds a 95% interval of the mean uses t with 2 degrees of freedom (4.30 two-sided): wide,
and honest. Paired differences (the same seeds for two variants) cancel what a seed fixes for
both: the data order, the weights that do not depend on the router, the evaluation set.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the regularised incomplete beta function (modified Lentz)."""
    tiny, eps = 1e-300, 1e-15
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 500):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < eps:
            break
    return h


def betainc(a: float, b: float, x: float) -> float:
    """The regularised incomplete beta function I_x(a, b)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with `df` degrees of freedom."""
    tail = 0.5 * betainc(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t > 0 else tail


def t_ppf(q: float, df: float) -> float:
    """The q-quantile of Student's t (bisection on the CDF)."""
    if not 0.0 < q < 1.0:
        raise ValueError(f"quantile must be in (0, 1), got {q}")
    lo, hi = -1e6, 1e6
    for _ in range(200):
        mid = (lo + hi) / 2.0
        if t_cdf(mid, df) < q:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2.0


@dataclass
class Summary:
    """Mean, sample standard deviation and the two-sided interval of the mean over n values."""

    n: int
    mean: float
    sd: float | None
    ci_low: float | None
    ci_high: float | None

    def to_dict(self) -> dict:
        return asdict(self)


def summarize(values: Sequence[float], confidence: float = 0.95) -> Summary:
    n = len(values)
    if n == 0:
        raise ValueError("no values to summarize")
    mean = sum(values) / n
    if n == 1:
        return Summary(1, mean, None, None, None)
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = t_ppf(0.5 + confidence / 2.0, n - 1) * sd / math.sqrt(n)
    return Summary(n, mean, sd, mean - half, mean + half)


@dataclass
class PairedTest:
    """Differences variant - baseline over the seeds both have, and the paired t-test of mean 0."""

    n: int
    mean_diff: float
    sd: float | None
    ci_low: float | None
    ci_high: float | None
    t: float | None
    p: float | None  # two-sided

    @property
    def excludes_zero(self) -> bool:
        return self.ci_low is not None and (self.ci_low > 0 or self.ci_high < 0)

    def to_dict(self) -> dict:
        return {**asdict(self), "excludes_zero": self.excludes_zero}


def paired_test(variant: Sequence[float], baseline: Sequence[float], confidence: float = 0.95) -> PairedTest:
    if len(variant) != len(baseline):
        raise ValueError(f"paired values need equal counts, got {len(variant)} and {len(baseline)}")
    diffs = [v - b for v, b in zip(variant, baseline)]
    s = summarize(diffs, confidence)
    if s.sd is None:
        return PairedTest(s.n, s.mean, None, None, None, None, None)
    if s.sd == 0.0:
        p = 1.0 if s.mean == 0 else 0.0
        return PairedTest(s.n, s.mean, 0.0, s.mean, s.mean, None, p)
    t = s.mean / (s.sd / math.sqrt(s.n))
    p = 2.0 * (1.0 - t_cdf(abs(t), s.n - 1))
    return PairedTest(s.n, s.mean, s.sd, s.ci_low, s.ci_high, t, p)
