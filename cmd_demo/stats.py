"""Paired comparisons of runs over training seeds (the ablation harness's statistics).

Two rows trained with the same seeds on the same corpus are compared seed by seed: the difference
of a metric per seed, its mean, its 95 % interval (Student's t, n - 1 degrees of freedom), and how
many seeds the observed spread would need for the interval to exclude zero.
"""

import math
import statistics
from typing import Dict, Mapping, Optional

from scipy import stats as scipy_stats

__all__ = ["paired_difference", "seeds_to_resolve"]


def _half_width(sd: float, n: int, level: float) -> float:
    return float(scipy_stats.t.ppf(0.5 + level / 2, n - 1)) * sd / math.sqrt(n)


def seeds_to_resolve(mean: float, sd: float, level: float = 0.95, limit: int = 1000) -> Optional[int]:
    """Smallest number of paired seeds n >= 2 whose ``level`` interval of a mean difference ``mean``
    with per-seed spread ``sd`` excludes zero; None when ``mean`` is 0 or more than ``limit`` are needed."""
    if mean == 0:
        return None
    if sd == 0:
        return 2
    for n in range(2, limit + 1):
        if _half_width(sd, n, level) < abs(mean):
            return n
    return None


def paired_difference(a: Mapping[int, float], b: Mapping[int, float], level: float = 0.95) -> Dict:
    """``a`` - ``b`` over the seeds both have ({seed: value}) -> {"seeds", "n", "mean", "sd", "low",
    "high", "resolved" (the interval excludes 0), "seeds_needed" (at the observed spread)}.
    With one common seed the interval is undefined (None)."""
    seeds = sorted(set(a) & set(b))
    if not seeds:
        raise ValueError("no seed in common: paired differences need the same seeds in both rows")
    diffs = [float(a[s]) - float(b[s]) for s in seeds]
    n, mean = len(diffs), statistics.fmean(diffs)
    out = {
        "seeds": seeds,
        "n": n,
        "mean": mean,
        "sd": None,
        "low": None,
        "high": None,
        "resolved": None,
        "seeds_needed": None,
    }
    if n > 1:
        sd = statistics.stdev(diffs)
        half = _half_width(sd, n, level)
        out.update(
            sd=sd,
            low=mean - half,
            high=mean + half,
            resolved=not (mean - half <= 0 <= mean + half),
            seeds_needed=seeds_to_resolve(mean, sd, level),
        )
    return out
