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
    when the baseline's mean is ``inf`` (the baseline never reached it: nothing to compare with)."""
    seeds = sorted(set(method) & set(baseline))
    if not seeds:
        return math.nan, math.nan, math.nan

    def ratio(ss: Sequence[int]) -> float:
        num, den = _mean([method[s] for s in ss]), _mean([baseline[s] for s in ss])
        if math.isinf(den):
            return math.nan
        return math.inf if math.isinf(num) else num / den

    point = ratio(seeds)
    rng = random.Random(seed)
    draws = [ratio(rng.choices(seeds, k=len(seeds))) for _ in range(n_boot)]
    if any(math.isnan(d) for d in draws):  # some resample drew only baseline misses
        return point, math.nan, math.nan
    draws.sort()
    return point, _percentile(draws, (1 - level) / 2), _percentile(draws, 1 - (1 - level) / 2)
