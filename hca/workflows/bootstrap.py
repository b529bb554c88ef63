"""Bootstrap confidence intervals over seeds (percentile method), for the multi-seed experiment.

Pure Python (no torch): values are per-seed figures, resampled with replacement ``n_boot`` times
from a fixed seed, so a table is reproducible. A run that never reached the target has cost
``math.inf``: any resample that draws it has an infinite mean, so an interval whose upper end is
``inf`` says "not shown to reach it", never a made-up cost.
"""
from __future__ import annotations

import math
import random
import statistics
from typing import Sequence


def _percentile(sorted_xs: list[float], q: float) -> float:
    """Linear-interpolated percentile ``q`` in [0, 1] of sorted values (``inf`` allowed)."""
    if not sorted_xs:
        return math.nan
    pos = q * (len(sorted_xs) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    a, b = sorted_xs[lo], sorted_xs[hi]
    if lo == hi or a == b:
        return a
    if math.isinf(a) or math.isinf(b):
        return b if pos - lo > 0 else a
    return a + (b - a) * (pos - lo)


def _mean(xs: Sequence[float]) -> float:
    return math.inf if any(math.isinf(x) for x in xs) else statistics.fmean(xs)


def bootstrap_ci(values: Sequence[float], level: float = 0.95, n_boot: int = 10_000, seed: int = 0
                 ) -> tuple[float, float]:
    """``(lo, hi)``: the percentile bootstrap interval of the mean of ``values`` (NaN, NaN if empty)."""
    xs = list(values)
    if not xs:
        return math.nan, math.nan
    rng = random.Random(seed)
    means = sorted(_mean(rng.choices(xs, k=len(xs))) for _ in range(n_boot))
    return _percentile(means, (1 - level) / 2), _percentile(means, 1 - (1 - level) / 2)


def paired_ratio_ci(method: dict[int, float], baseline: dict[int, float], level: float = 0.95, n_boot: int = 10_000,
                    seed: int = 0) -> tuple[float, float, float]:
    """``(ratio, lo, hi)`` of ``mean(method) / mean(baseline)`` over the seeds both have, with a
    bootstrap interval that resamples seeds (pairs kept together: seed ``s`` of both runs saw the
    same problems from the same start). ``inf`` entries (never reached) propagate: a method that
    missed the target on some seed cannot have a finite upper end. NaNs when no seed is shared, or
    when the baseline's mean is ``inf`` (the baseline never reached it: nothing to compare with) or 0
    (it was at the target before any RL sample, as in a regime where the target is about the start)."""
    seeds = sorted(set(method) & set(baseline))
    if not seeds:
        return math.nan, math.nan, math.nan

    def ratio(ss: Sequence[int]) -> float:
        num, den = _mean([method[s] for s in ss]), _mean([baseline[s] for s in ss])
        if math.isinf(den) or den == 0:
            return math.nan
        return math.inf if math.isinf(num) else num / den

    point = ratio(seeds)
    rng = random.Random(seed)
    draws = [ratio(rng.choices(seeds, k=len(seeds))) for _ in range(n_boot)]
    if any(math.isnan(d) for d in draws):  # some resample drew only baseline misses
        return point, math.nan, math.nan
    draws.sort()
    return point, _percentile(draws, (1 - level) / 2), _percentile(draws, 1 - (1 - level) / 2)


def first_reaching_samples(curve: Sequence[tuple[float, float]], target: float) -> float:
    """RL samples at the first ``(samples, pass@1)`` point with ``pass@1 >= target`` (``inf``: never)."""
    return next((float(x) for x, y in curve if y >= target - 1e-12), math.inf)


def budget_ratio_ci(curves: dict[int, Sequence[tuple[float, float]]], baseline_final: dict[int, float], budget: float,
                    level: float = 0.95, n_boot: int = 10_000, seed: int = 0) -> tuple[float, float, float]:
    """``(ratio, lo, hi)``: the RL samples a method needs to reach the baseline's final pass@1, as a
    fraction of the budget the baseline spent to get there, over the seeds both have. ``curves[s]``
    is the method's ``[(samples, pass@1), ...]`` of seed ``s``, ``baseline_final[s]`` the baseline's
    last pass@1 of that seed. The target is the mean of the baseline finals of the seeds drawn, so
    each resample redraws the target too (its uncertainty is in the interval). A seed that never
    reaches it costs ``inf``: then the ratio is ``inf`` (an interval open above says "not shown").
    A ratio of 0.5 with ``hi < 1`` is the claim "reaches the baseline's final pass@1 with about
    half its samples"."""
    seeds = sorted(set(curves) & set(baseline_final))
    if not seeds or budget <= 0:
        return math.nan, math.nan, math.nan

    def ratio(ss: Sequence[int]) -> float:
        target = statistics.fmean(baseline_final[s] for s in ss)
        return _mean([first_reaching_samples(curves[s], target) for s in ss]) / budget

    point = ratio(seeds)
    rng = random.Random(seed)
    draws = sorted(ratio(rng.choices(seeds, k=len(seeds))) for _ in range(n_boot))
    return point, _percentile(draws, (1 - level) / 2), _percentile(draws, 1 - (1 - level) / 2)
