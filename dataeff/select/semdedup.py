"""SemDeDup (Abbas et al. 2023) with a fixed eps, then a seeded random fill to the ratio.

Inside each k-means cluster, a member whose cosine similarity to an earlier member
exceeds 1 - eps is a near-duplicate (the per-cluster scan is MedDEL's
:func:`dataeff.select.meddel.cluster_redundancy` with the ``hard`` order). Here the
survivors are then sampled (or topped up from the removed) at random to round(R*N),
so every method is compared at exactly the same kept count. Pure numpy; the shell is
``semdedup_run.py``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dataeff.config import ConfigError, option
from dataeff.select.baselines import random_scores


@dataclass
class SemDeDupConfig:
    """SemDeDup baseline settings."""

    epsilon: float = option(0.07, help="near-duplicate when cosine similarity > 1 - epsilon (SemDeDup's scale)")

    def __post_init__(self) -> None:
        if not 0.0 <= self.epsilon <= 2.0:
            raise ConfigError(f"semdedup.epsilon={self.epsilon}: must be in [0, 2]")


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
