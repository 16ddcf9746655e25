"""Confidence intervals over seeds: Student-t intervals of a mean and of a paired difference (same seed = same
shared start, same data order, same sampling seed, so per-seed differences cancel the seed's own luck)."""

from __future__ import annotations

import math
from statistics import NormalDist

# Two-sided 95% Student-t quantiles t_{0.975, df} for df = 1..30 (standard tables).
_T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
         2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042]


def t_quantile_975(df: int) -> float:
    """t_{0.975, df}: the table for df <= 30, beyond it the Cornish-Fisher expansion around the normal quantile
    (error < 1e-3 for df > 30)."""
    if df < 1:
        raise ValueError(f"df={df}: a t interval needs at least 2 values (df >= 1).")
    if df <= 30:
        return _T975[df - 1]
    z = NormalDist().inv_cdf(0.975)
    return z + (z ** 3 + z) / (4 * df) + (5 * z ** 5 + 16 * z ** 3 + 3 * z) / (96 * df ** 2)


def mean_ci(values: list[float]) -> tuple[float, float]:
    """(mean, half-width of the 95% t interval: t_{0.975, n-1} * s / sqrt(n)); half-width NaN for one value."""
    n = len(values)
    if n == 0:
        raise ValueError("mean_ci of no values")
    mean = sum(values) / n
    if n == 1:
        return mean, float("nan")
    s = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    return mean, t_quantile_975(n - 1) * s / math.sqrt(n)


def paired_difference(a: dict, b: dict) -> tuple[float, float, int]:
    """Mean and 95% half-width of a[seed] - b[seed] over the seeds both have, and that number of seeds."""
    seeds = sorted(set(a) & set(b))
    if not seeds:
        raise ValueError("paired_difference: no seed in common")
    mean, half = mean_ci([a[s] - b[s] for s in seeds])
    return mean, half, len(seeds)


def disjoint(a: tuple[float, float], b: tuple[float, float]) -> bool:
    """Whether two (mean, half-width) intervals do not overlap (a point has half-width 0)."""
    (ma, ha), (mb, hb) = a, b
    ha, hb = (0.0 if math.isnan(h) else h for h in (ha, hb))
    return ma + ha < mb - hb or mb + hb < ma - ha


def sign_test(a: dict, b: dict) -> dict:
    """Exact two-sided sign test of a[seed] - b[seed] over the common seeds: wins, losses, ties (dropped, as the test
    does) and p = P(a split at least as uneven as the observed one | no difference), from
    Binomial(wins + losses, 1/2)."""
    seeds = sorted(set(a) & set(b))
    if not seeds:
        raise ValueError("sign_test: no seed in common")
    wins = sum(a[s] > b[s] for s in seeds)
    losses = sum(a[s] < b[s] for s in seeds)
    n, k = wins + losses, min(wins, losses)
    p = min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n) if n else 1.0
    return {"wins": wins, "losses": losses, "ties": len(seeds) - n, "p": p}
