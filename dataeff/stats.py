"""Honest uncertainty for a sweep report: Student-t intervals over seeds, paired by seed.

A sweep runs every (method, ratio) cell with a few seeds (typically 3). With so few,
a normal interval is far too narrow: the t quantile for 2 degrees of freedom is 4.30,
not 1.96. Comparisons between two cells pair their runs by seed (same seed = same
fine-tuning split and initialisation), which removes the seed-to-seed variation both
cells share. Pure numpy (+ scipy's t quantile); no I/O.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import NamedTuple

import numpy as np
from scipy.stats import t as student_t


class Interval(NamedTuple):
    """A mean with its two-sided confidence interval over ``n`` values (NaN bounds when n < 2)."""

    mean: float
    low: float
    high: float
    n: int


def mean_ci(values: Iterable[float], level: float = 0.95) -> Interval:
    """Mean and Student-t interval ``mean ± t_{(1+level)/2, n-1} · s/√n``; NaN values are ignored.

    Args:
        values: one number per seed.
        level: two-sided confidence level in (0, 1).

    Returns:
        ``(mean, low, high, n)``; with one value ``(v, nan, nan, 1)``, with none
        ``(nan, nan, nan, 0)``.

    Shape:
        values: (n,) -> four scalars.
    """
    if not 0.0 < level < 1.0:
        raise ValueError(f"level={level}: must be in (0, 1), e.g. 0.95")
    x = np.asarray(list(values), dtype=np.float64).ravel()
    x = x[~np.isnan(x)]
    n = int(x.size)
    if n == 0:
        return Interval(math.nan, math.nan, math.nan, 0)
    mean = float(x.mean())
    if n == 1:
        return Interval(mean, math.nan, math.nan, 1)
    half = float(student_t.ppf((1.0 + level) / 2.0, n - 1)) * float(x.std(ddof=1)) / math.sqrt(n)
    return Interval(mean, mean - half, mean + half, n)


def paired_diff(a_by_seed: Mapping[int, float], b_by_seed: Mapping[int, float], level: float = 0.95) -> Interval:
    """Difference a − b paired by seed: :func:`mean_ci` of the per-seed differences.

    Only seeds both cells have count; a seed whose difference is NaN (a failed run) is
    dropped like any NaN.
    """
    seeds = sorted(set(a_by_seed) & set(b_by_seed))
    return mean_ci([float(a_by_seed[s]) - float(b_by_seed[s]) for s in seeds], level)


def low_at_level(mean: float, low: float, n: int, level: float, base: float = 0.95) -> float:
    """The lower bound of a Student-t interval at ``base`` re-drawn at ``level`` (same mean, s and n).

    Used for a family of comparisons: ``level = 1 - (1 - base) / m`` is the Bonferroni bound
    each of m comparisons must clear so that, together, a false "better" has at most
    ``1 - base`` probability. NaN when ``n < 2``.
    """
    if n < 2 or math.isnan(low):
        return math.nan
    scale = student_t.ppf((1.0 + level) / 2.0, n - 1) / student_t.ppf((1.0 + base) / 2.0, n - 1)
    return float(mean - (mean - low) * scale)


def _signed(value: float) -> str:
    # U+2212 for negatives, so the sign lines up with '+' in a table; 0.0 prints as +0.0.
    text = f"{abs(value):.1f}"
    return ("−" if value < 0 and text != "0.0" else "+") + text


def verdict_sentence(
    name_a: str, name_b: str, diff: Interval, unit_scale: float = 100, unit: str = "mIoU", level: float = 0.95
) -> str:
    """One plain sentence on a paired difference (higher = better), in points when ``unit_scale=100``.

    ``diff`` is :func:`paired_diff`'s result; ``level`` only labels the sentence and
    must be the one the interval was computed with.

    Examples:
        ``"MedDEL 5% vs full: −0.3 mIoU [−1.1, +0.5]: not distinguishable with 3 seeds"``,
        ``"... better beyond the 95% CI"``, ``"... worse beyond the 95% CI"``,
        ``"MedDEL 5% vs full: +0.4 mIoU: one seed: no interval"``.
    """
    head = f"{name_a} vs {name_b}"
    if diff.n == 0 or math.isnan(diff.mean):
        return f"{head}: no seed in common: no comparison"
    mean = f"{_signed(diff.mean * unit_scale)} {unit}"
    if diff.n == 1 or math.isnan(diff.low):
        return f"{head}: {mean}: one seed: no interval"
    ci = f"[{_signed(diff.low * unit_scale)}, {_signed(diff.high * unit_scale)}]"
    pct = f"{level * 100:g}%"
    if diff.low > 0:
        verdict = f"better beyond the {pct} CI"
    elif diff.high < 0:
        verdict = f"worse beyond the {pct} CI"
    else:
        verdict = f"not distinguishable with {diff.n} seeds"
    return f"{head}: {mean} {ci}: {verdict}"
