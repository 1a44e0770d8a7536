"""Confidence intervals for the figures the evaluations and benchmarks report.

A judged accuracy is a proportion over n images: its 95% interval is Wilson's score interval (Wilson 1927), which
stays inside [0, 1] and is honest at small n and near 0 or 1, unlike the normal approximation. It treats the images
as independent; images of one prompt are not (a prompt the model cannot draw fails all of its images), so it is a
lower bound on the uncertainty. A figure over seeds is a mean over k runs: its 95% interval is Student's t interval on
their standard deviation, which accounts for everything that changes with the seed (data, training, sampling).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

# 0.975 quantiles of Student's t (two-sided 95%) for 1-30 degrees of freedom; beyond, the normal 1.96 (2% narrow).
_T_975 = (
    *(12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228),
    *(2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086),
    *(2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042),
)
Z_95 = 1.959964


def wilson_interval(successes: float, n: int, z: float = Z_95) -> tuple[float, float]:
    """95% interval (low, high) of a proportion `successes / n`; (0, 1) when n is 0."""
    if n <= 0:
        return (0.0, 1.0)
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


def mean_interval(values, bounds: tuple[float, float] | None = None) -> dict:
    """{"mean", "std", "low", "high", "n"}: the mean of `values` and its 95% t interval, clipped to `bounds` (e.g.
    (0, 1) for a proportion). One value has no spread to estimate: std, low and high are None."""
    values = [float(v) for v in values]
    if not values:
        raise ValueError("mean_interval needs at least one value")
    n = len(values)
    mean = sum(values) / n
    if n == 1:
        return {"mean": mean, "std": None, "low": None, "high": None, "n": 1}
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = (_T_975[n - 2] if n - 1 <= len(_T_975) else Z_95) * std / math.sqrt(n)
    low, high = mean - half, mean + half
    if bounds is not None:
        low, high = max(bounds[0], low), min(bounds[1], high)
    return {"mean": mean, "std": std, "low": low, "high": high, "n": n}


def bar_holds(per_seed: Mapping[int, float], per_seed_n: Mapping[int, int], bar: float) -> dict:
    """Whether a proportion's bar holds over seeds: the mean meets it, and no seed misses it by more than that seed's
    own 95% interval (the upper end of its Wilson interval over its n judged images is below the bar). Returns the
    mean and its t interval over the seeds (`mean_interval`, within [0, 1]), the bar, the verdict, and the seeds that
    miss beyond their interval."""
    summary = mean_interval(per_seed.values(), bounds=(0.0, 1.0))
    misses = [
        seed
        for seed, value in per_seed.items()
        if wilson_interval(value * per_seed_n[seed], per_seed_n[seed])[1] < bar
    ]
    return {**summary, "bar": bar, "holds": summary["mean"] >= bar and not misses, "seeds_missing": misses}


def difference_interval(p1: float, n1: int, p2: float, n2: int) -> tuple[float, float]:
    """95% interval (low, high) of p1 - p2, two independent proportions over n1 and n2 trials: Newcombe's hybrid score
    interval (Newcombe 1998, method 10), built from each proportion's Wilson interval."""
    low1, high1 = wilson_interval(p1 * n1, n1)
    low2, high2 = wilson_interval(p2 * n2, n2)
    d = p1 - p2
    return d - math.sqrt((p1 - low1) ** 2 + (high2 - p2) ** 2), d + math.sqrt((high1 - p1) ** 2 + (p2 - low2) ** 2)


def gain_holds(
    ours: Mapping[int, float], theirs: Mapping[int, float], n: Mapping[int, tuple[int, int]], bar: float
) -> dict:
    """Whether a bar on the gain ours - theirs (two proportions per seed, paired by seed; `n[seed]`: their numbers of
    trials) holds over seeds, by the rule of `bar_holds`: the mean gain meets it, and no seed's gain misses it by
    more than its own 95% interval (`difference_interval`). Returns the mean gain and its t interval over the seeds,
    the bar, the verdict, and the seeds that miss beyond their interval."""
    gains = {seed: ours[seed] - theirs[seed] for seed in ours}
    summary = mean_interval(gains.values())
    misses = [seed for seed in gains if difference_interval(ours[seed], n[seed][0], theirs[seed], n[seed][1])[1] < bar]
    return {**summary, "bar": bar, "holds": summary["mean"] >= bar and not misses, "seeds_missing": misses}
