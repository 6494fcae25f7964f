"""Select-stage shell of SemDeDup: distributed k-means and redundancy scan, then the pure decision."""

from __future__ import annotations

import time

import numpy as np
import pandas as pd

from dataeff.select.config import SelectConfig
from dataeff.select.distributed_cluster import cluster_pool, redundancy_stats
from dataeff.select.manifest import Decisions, decided_reasons, target_count
from dataeff.select.semdedup import semdedup_decide


def run_semdedup(
    emb: np.ndarray, keys: np.ndarray | None, quality: pd.DataFrame | None, cfg: SelectConfig, rank: int, world: int
) -> Decisions:
    """SemDeDup with a fixed eps inside k-means clusters, then a seeded random fill to round(R*N).

    Shape:
        emb: (N, D) float16 unit rows, keys: (N,) sorted or None (unread) -> decisions for N rows
        (score = cosine distance to the own centroid).
    """
    n = len(emb)
    timings: dict[str, float] = {}
    labels, sims, k = cluster_pool(emb, cfg.cluster, cfg.seed, rank, world, timings)
    t = time.time()
    # SemDeDup visits each cluster farthest-from-centroid first, as MedDEL's default order.
    m, prev, _ = redundancy_stats(emb, labels, sims, np.ones(n, bool), k, "hard", cfg.seed, rank, world)
    timings["dedup"] = time.time() - t
    kept, redundant = semdedup_decide(m, cfg.semdedup.epsilon, target_count(cfg.ratio, n), cfg.seed)
    reason = decided_reasons(np.zeros(n, np.uint8), kept, redundant, prev)
    info = {"k": k, "epsilon": cfg.semdedup.epsilon, "timings_s": {a: round(b, 4) for a, b in timings.items()}}
    return Decisions(kept, reason, labels, np.subtract(1.0, sims, out=sims), info)
