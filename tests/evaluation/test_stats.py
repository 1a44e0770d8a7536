"""Confidence intervals: known values, edges, and the bar-over-seeds rule."""

import math

import pytest

from clipcond.evaluation.stats import bar_holds, difference_interval, gain_holds, mean_interval, wilson_interval


def test_wilson_interval_known_values_and_edges():
    low, high = wilson_interval(81, 100)  # p = 0.81, n = 100: (0.722, 0.875) by the closed form
    assert math.isclose(low, 0.7222, abs_tol=1e-3) and math.isclose(high, 0.8748, abs_tol=1e-3)
    assert wilson_interval(0, 10)[0] == 0.0 and math.isclose(wilson_interval(10, 10)[1], 1.0)
    assert wilson_interval(0, 10)[1] > 0.2  # zero successes in 10 does not prove the rate is 0
    assert wilson_interval(5, 0) == (0.0, 1.0)
    narrow, wide = wilson_interval(800, 1000), wilson_interval(8, 10)
    assert narrow[1] - narrow[0] < (wide[1] - wide[0]) / 5


def test_mean_interval():
    summary = mean_interval([0.8, 0.9, 1.0])
    assert math.isclose(summary["mean"], 0.9) and math.isclose(summary["std"], 0.1)
    assert math.isclose(summary["high"] - summary["mean"], 4.303 * 0.1 / math.sqrt(3), rel_tol=1e-3)
    assert mean_interval([0.8, 0.9, 1.0], bounds=(0.0, 1.0))["high"] == 1.0  # a proportion stays a proportion
    assert math.isclose(
        mean_interval([0.0, 1.0] * 6)["high"] - 0.5, 2.201 * math.sqrt(3 / 11) / math.sqrt(12), rel_tol=1e-3
    )
    assert mean_interval([0.5]) == {"mean": 0.5, "std": None, "low": None, "high": None, "n": 1}  # no spread from one
    with pytest.raises(ValueError, match="at least one"):
        mean_interval([])


def test_bar_holds_only_when_the_mean_meets_it_and_no_seed_misses_beyond_its_interval():
    n = {0: 112, 1: 112, 2: 112}
    assert bar_holds({0: 0.82, 1: 0.80, 2: 0.84}, n, 0.75)["holds"]
    assert not bar_holds({0: 0.74, 1: 0.70, 2: 0.72}, n, 0.75)["holds"]  # the mean misses
    lucky = bar_holds({0: 0.95, 1: 0.95, 2: 0.40}, n, 0.75)  # mean 0.77, but one seed far below
    assert not lucky["holds"] and lucky["seeds_missing"] == [2]
    assert bar_holds({0: 0.80, 1: 0.80, 2: 0.72}, n, 0.75)["holds"]  # 0.72 of 112 is within its interval of 0.75


def test_difference_interval_matches_newcombes_worked_examples():
    low, high = difference_interval(56 / 70, 70, 48 / 80, 80)  # Newcombe 1998, table II, example (a), method 10
    assert math.isclose(low, 0.0524, abs_tol=1e-4) and math.isclose(high, 0.3339, abs_tol=1e-4)
    low, high = difference_interval(9 / 10, 10, 3 / 10, 10)  # example (b)
    assert math.isclose(low, 0.1705, abs_tol=1e-4) and math.isclose(high, 0.8090, abs_tol=1e-4)


def test_gain_holds_only_when_the_mean_gain_meets_it_and_no_seed_misses_beyond_its_interval():
    n = {0: (400, 400), 1: (400, 400), 2: (400, 400)}
    plain = {0: 0.825, 1: 0.565, 2: 0.525}
    lucky = gain_holds({0: 0.952, 1: 0.9375, 2: 0.93}, plain, n, 0.20)  # mean +30 points, seed 0 only +12.7
    assert lucky["mean"] > 0.20 and not lucky["holds"] and lucky["seeds_missing"] == [0]
    assert gain_holds({0: 0.99, 1: 0.9375, 2: 0.93}, plain, n, 0.20)["holds"]  # +16.5 of 400 pairs: within
    assert not gain_holds({0: 0.7, 1: 0.7, 2: 0.7}, plain, n, 0.20)["holds"]  # the mean misses
