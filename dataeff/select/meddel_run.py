"""Select-stage shell of MedDEL: quality and outlier checks, distributed clustering and redundancy, exact ratio.

The pure steps are in ``meddel.py``; k-means and the per-cluster redundancy scan are
spread over ranks by ``distributed_cluster.py`` and gathered, so every rank reaches
the same decisions.
"""

from __future__ import annotations

import time

import numpy as np
import pandas as pd

from dataeff.constants import QUALITY_KEYS
from dataeff.select import meddel as M
from dataeff.select.config import SelectConfig
from dataeff.select.distributed_cluster import cluster_pool, redundancy_stats
from dataeff.select.manifest import Decisions, reasons_for, redundant_reasons, target_count


def run_meddel(
    emb: np.ndarray, keys: np.ndarray, quality: pd.DataFrame | None, cfg: SelectConfig, rank: int, world: int
) -> Decisions:
    """MedDEL (PAPERS.md): invalid frames and embedding outliers out, redundancy by bisected eps, exact ratio.

    Args:
        quality: the pool's index rows aligned to ``keys`` (quality statistics may be NaN:
            the quality checks are then skipped), or None.

    Shape:
        emb: (N, D) float16 unit rows, keys: (N,) sorted -> decisions for N rows
        (score = cosine distance to the own centroid).
    """
    n, mc = len(keys), cfg.meddel
    timings: dict[str, float] = {}
    has_quality = quality is not None and not quality[list(QUALITY_KEYS)].isna().all().all()
    qreason = M.quality_reasons(quality, mc) if quality is not None and has_quality else np.full(n, "", object)
    labels, sims, k = cluster_pool(emb, cfg.cluster, cfg.seed, rank, world, timings)
    invalid = np.where(
        qreason != "",
        qreason,
        M.embedding_outliers(labels, sims, qreason == "", k, mc.outlier_quantile, mc.min_cluster_size),
    )
    t = time.time()
    m, prev, pos = redundancy_stats(emb, labels, sims, invalid == "", k, mc.order, cfg.seed, rank, world)
    timings["dedup"] = time.time() - t
    t = time.time()
    kept, redundant, info = M.decide(labels, m, pos, invalid, target_count(cfg.ratio, n), mc.epsilon)
    reason = redundant_reasons(invalid, redundant, prev, keys)
    timings["ratio_fill"] = time.time() - t
    info.update(
        k=k,
        quality_checks=mc.quality_checks if has_quality else [],
        timings_s={a: round(b, 4) for a, b in timings.items()},
    )
    return Decisions(kept, reasons_for(kept, reason), labels, (1.0 - sims).astype(np.float32), info)
