"""Baseline selections: ``full``, ``random`` and ``semdedup`` (dedup only, then random fill).

Pure numpy over key-sorted arrays; the selection stage gathers what they need.
SemDeDup (Abbas et al. 2023) removes, inside each k-means cluster, members whose
cosine similarity to an earlier member exceeds 1 - eps, for a fixed eps; here the
survivors are then sampled (or topped up from the removed) at random to the ratio,
so every method is compared at exactly the same kept count.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dataeff.config import ConfigError, option


@dataclass
class SemDeDupConfig:
    """SemDeDup baseline settings."""

    epsilon: float = option(0.07, help="near-duplicate when cosine similarity > 1 - epsilon (SemDeDup's scale)")

    def __post_init__(self) -> None:
        if not 0.0 <= self.epsilon <= 2.0:
            raise ConfigError(f"semdedup.epsilon={self.epsilon}: must be in [0, 2]")


def select_full(n: int) -> np.ndarray:
    """Every sample kept. Shape: -> (n,) bool."""
    return np.ones(n, dtype=bool)


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


def semdedup_decide(m: np.ndarray, epsilon: float, target: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Keep ``target`` samples: random among SemDeDup survivors, topped up at random from the removed.

    Shape:
        m: (N,) largest similarity to an earlier member of the cluster (-inf for the first)
        -> kept (N,) bool, redundant (N,) bool (removed as near-duplicates and not refilled).
    """
    score = random_scores(len(m), seed)
    survivors = m <= 1.0 - epsilon
    order = np.lexsort((np.arange(len(m)), score))
    kept = np.zeros(len(m), dtype=bool)
    surv_order = order[survivors[order]]
    if len(surv_order) >= target:
        kept[surv_order[:target]] = True
        return kept, ~survivors
    kept[surv_order] = True
    red_order = order[~survivors[order]]
    kept[red_order[: target - len(surv_order)]] = True
    return kept, ~survivors & ~kept
