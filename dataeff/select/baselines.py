"""Baseline selection cores: ``full`` keeps everything, ``random`` a seeded uniform draw.

Pure numpy over the key-sorted pool; the shells are in ``baselines_run.py``.
:func:`random_scores` is also SemDeDup's fill order (``semdedup.py``), so the random
part of every baseline is the same draw for a given seed.
"""

from __future__ import annotations

import numpy as np


def random_scores(n: int, seed: int) -> np.ndarray:
    """One seeded uniform draw per (key-sorted) sample; the lowest ``target`` are kept.

    Shape:
        -> (n,) float64.
    """
    return np.random.default_rng(seed).random(n)


def select_random(n: int, target: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``target`` samples drawn uniformly without replacement.

    Shape:
        -> kept (n,) bool, score (n,) float64 (the draw; ties impossible in practice,
        broken by row index).
    """
    score = random_scores(n, seed)
    kept = np.zeros(n, dtype=bool)
    kept[np.lexsort((np.arange(n), score))[:target]] = True
    return kept, score
