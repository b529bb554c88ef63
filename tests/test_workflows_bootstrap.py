"""Bootstrap intervals of the experiment: exact on constant data, reproducible, honest about runs
that never reached the target (inf), and a paired ratio that excludes 1 only when it should."""
import math

import pytest

from hca.workflows.bootstrap import _percentile, bootstrap_ci, paired_ratio_ci


def test_percentile_hand_table():
    xs = [1.0, 2.0, 3.0, 4.0, 5.0]
    assert _percentile(xs, 0.0) == 1.0 and _percentile(xs, 1.0) == 5.0 and _percentile(xs, 0.5) == 3.0
    assert _percentile(xs, 0.125) == pytest.approx(1.5)  # position 0.5 between 1 and 2
    assert _percentile([1.0, math.inf], 1.0) == math.inf and _percentile([1.0, math.inf], 0.0) == 1.0


def test_constant_values_give_a_point_interval_and_empty_gives_nan():
    assert bootstrap_ci([0.4] * 5) == (0.4, 0.4)
    lo, hi = bootstrap_ci([])
    assert math.isnan(lo) and math.isnan(hi)


def test_interval_contains_the_mean_is_reproducible_and_narrows_with_more_seeds():
    xs = [0.30, 0.35, 0.41, 0.38, 0.33]
    lo, hi = bootstrap_ci(xs)
    assert lo <= sum(xs) / 5 <= hi and min(xs) <= lo < hi <= max(xs)
    assert bootstrap_ci(xs) == (lo, hi)  # fixed seed
    lo2, hi2 = bootstrap_ci(xs * 4)
    assert hi2 - lo2 < hi - lo


def test_a_run_that_never_reached_makes_the_upper_end_infinite():
    lo, hi = bootstrap_ci([100.0, 120.0, math.inf, 110.0, 90.0])
    assert math.isfinite(lo) and hi == math.inf


def test_paired_ratio():
    base = {s: 1000.0 + 10 * s for s in range(5)}
    half = {s: 0.5 * v for s, v in base.items()}
    r, lo, hi = paired_ratio_ci(half, base)
    assert r == pytest.approx(0.5) and lo == pytest.approx(0.5) and hi == pytest.approx(0.5)
    noisy = {0: 400.0, 1: 1300.0, 2: 500.0, 3: 1200.0, 4: 450.0}  # sometimes better, sometimes worse
    r, lo, hi = paired_ratio_ci(noisy, base)
    assert lo < 1 < hi  # the interval cannot tell
    missed = {**half, 2: math.inf}
    r, lo, hi = paired_ratio_ci(missed, base)
    assert r == math.inf and hi == math.inf
    r, lo, hi = paired_ratio_ci(half, {s: math.inf for s in base})  # the baseline never reached it
    assert math.isnan(r)
    assert all(math.isnan(x) for x in paired_ratio_ci({9: 1.0}, base))


def test_budget_ratio_by_hand():
    from hca.workflows.bootstrap import budget_ratio_ci, first_reaching_samples

    fast = {0: [(0, .2), (100, .32), (200, .35)], 1: [(0, .2), (100, .30), (200, .40)]}
    finals = {0: .30, 1: .30}
    assert first_reaching_samples(fast[0], .30) == 100 and first_reaching_samples(fast[0], .9) == math.inf
    assert budget_ratio_ci(fast, finals, 200) == (0.5, 0.5, 0.5)  # both seeds reach 0.30 at 100 of 200 samples
    # the target is redrawn with the seeds: finals 0.30 and 0.34 give 0.32 on the full draw (seed 1 reaches
    # it at 200), 0.30 on draws of seed 0 only (both at 100), 0.34 on seed 1 only (seed 0 at 200, seed 1 at 200)
    point, lo, hi = budget_ratio_ci(fast, {0: .30, 1: .34}, 200)
    assert point == pytest.approx((100 + 200) / 2 / 200) and lo == pytest.approx(0.5) and hi == pytest.approx(1.0)
    miss = {0: fast[0], 1: [(0, .2), (200, .25)]}
    point, lo, hi = budget_ratio_ci(miss, finals, 200)
    assert math.isinf(point) and lo == 0.5 and math.isinf(hi)  # a seed that never reaches it: open above
    assert all(math.isnan(x) for x in budget_ratio_ci(fast, {}, 200))


def test_paired_ratio_when_the_baseline_starts_at_the_target():
    from hca.workflows.bootstrap import paired_ratio_ci

    # sparse regime: GRPO's target is about its start, so a seed reaches it at 0 samples
    point, lo, hi = paired_ratio_ci({0: 1280.0, 1: 0.0}, {0: 0.0, 1: 0.0})
    assert math.isnan(point) and math.isnan(lo) and math.isnan(hi)
    point, lo, hi = paired_ratio_ci({0: 1280.0, 1: 2560.0}, {0: 0.0, 1: 1280.0})
    assert point == 3.0 and math.isnan(lo)  # 1920 / 640; some resamples draw only seed 0: no interval
