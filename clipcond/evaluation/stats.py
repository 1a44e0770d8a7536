"""Confidence intervals for the figures the evaluations and benchmarks report.

A judged accuracy is a proportion over n images: its 95% interval is Wilson's score interval (Wilson 1927), which
stays inside [0, 1] and is honest at small n and near 0 or 1, unlike the normal approximation. A figure over seeds is
a mean over k runs: its 95% interval is Student's t interval on their standard deviation.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

# Two-sided 97.5% quantiles of Student's t for 1-10 degrees of freedom (then the normal 1.96 is within 10%).
_T_975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228)
Z_95 = 1.959964


def wilson_interval(successes: float, n: int, z: float = Z_95) -> tuple[float, float]:
    """95% interval (low, high) of a proportion `successes / n`; (0, 1) when n is 0."""
    if n <= 0:
        return (0.0, 1.0)
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


def mean_interval(values: Sequence[float]) -> dict:
    """{"mean", "std", "low", "high", "n"}: the mean of `values` and its 95% t interval (std 0 and the mean itself
    as both ends for a single value)."""
    values = [float(v) for v in values]
    if not values:
        raise ValueError("mean_interval needs at least one value")
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    half = (_T_975[n - 2] if n - 1 <= len(_T_975) else 1.96) * std / math.sqrt(n) if n > 1 else 0.0
    return {"mean": mean, "std": std, "low": mean - half, "high": mean + half, "n": n}


def bar_holds(per_seed: Sequence[float], per_seed_n: Sequence[int], bar: float) -> dict:
    """Whether a bar holds over seeds: the mean meets it, and no seed misses it by more than that seed's own 95%
    interval (its Wilson half-width over its n judged images). Returns the mean, its interval, and the verdict."""
    summary = mean_interval(per_seed)
    misses = []
    for value, n in zip(per_seed, per_seed_n, strict=True):
        low, high = wilson_interval(value * n, n)
        if high < bar:  # even the top of this seed's interval is below the bar
            misses.append(value)
    return {**summary, "bar": bar, "holds": summary["mean"] >= bar and not misses, "seeds_missing": misses}
