"""Paired comparisons of runs over training seeds (the ablation harness's statistics).

Two rows trained with the same seeds on the same corpus are compared seed by seed: the difference
of a metric per seed, its mean, its 95 % interval (Student's t, n - 1 degrees of freedom), and how
many seeds the observed spread would need for the interval to exclude zero.

Declared comparisons (the primaries of a pre-registered sweep) add a two-sided paired t-test p-value
per comparison, Holm's step-down correction across them (:func:`holm_adjust`), and the number of
paired seeds a planned effect needs for a given power (:func:`seeds_for_power`).
"""

import math
import statistics
from typing import Dict, Mapping, Optional

from scipy import stats as scipy_stats

__all__ = ["paired_difference", "seeds_to_resolve", "holm_adjust", "seeds_for_power", "paired_power"]


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
        "p": None,
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
            p=_paired_p(mean, sd, n),
        )
    return out


def _paired_p(mean: float, sd: float, n: int) -> float:
    """Two-sided p-value of the paired t-test of a mean difference against 0."""
    if sd == 0:
        return 1.0 if mean == 0 else 0.0
    t = mean / (sd / math.sqrt(n))
    return float(2.0 * scipy_stats.t.sf(abs(t), n - 1))


def holm_adjust(pvalues: Mapping[str, float]) -> Dict[str, float]:
    """Holm's step-down adjusted p-values ({name: p} -> {name: adjusted p}), controlling the
    family-wise error rate over all the names: sorted p_(1) <= ... <= p_(m), the adjusted
    p_(i) = max over j <= i of min(1, (m - j + 1) p_(j)). A comparison is significant at level a
    when its adjusted p <= a."""
    order = sorted(pvalues, key=lambda name: pvalues[name])
    m, running, out = len(order), 0.0, {}
    for i, name in enumerate(order):
        running = max(running, min(1.0, (m - i) * float(pvalues[name])))
        out[name] = running
    return {name: out[name] for name in pvalues}


def paired_power(delta: float, sd: float, n: int, alpha: float) -> float:
    """Power of the two-sided paired t-test at level ``alpha`` to detect a true mean difference
    ``delta`` with per-seed spread ``sd`` over ``n`` paired seeds (noncentral t)."""
    if n < 2:
        return 0.0
    df = n - 1
    crit = float(scipy_stats.t.ppf(1 - alpha / 2, df))
    ncp = delta / (sd / math.sqrt(n))
    return float(scipy_stats.nct.sf(crit, df, ncp) + scipy_stats.nct.cdf(-crit, df, ncp))


def seeds_for_power(delta: float, sd: float, alpha: float, power: float = 0.8, limit: int = 1000) -> Optional[int]:
    """Smallest number of paired seeds n >= 2 whose two-sided paired t-test at level ``alpha`` has
    at least ``power`` to detect a mean difference ``delta`` at spread ``sd``; None past ``limit``."""
    if delta == 0:
        return None
    if sd == 0:
        return 2
    for n in range(2, limit + 1):
        if paired_power(abs(delta), sd, n, alpha) >= power:
            return n
    return None
