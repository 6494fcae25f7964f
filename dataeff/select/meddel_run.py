"""Select-stage shell of MedDEL: quality and outlier checks, distributed clustering and redundancy, exact ratio.

The pure steps are in ``meddel.py``; k-means and the per-cluster redundancy scan are
spread over ranks by ``distributed_cluster.py`` and gathered, so every rank reaches
the same decisions.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import pandas as pd

from dataeff.config import ConfigError
from dataeff.constants import QUALITY_KEYS, SHARDS_FORMAT, SIGNATURE_KEYS
from dataeff.data.signatures import index_signatures
from dataeff.select import meddel as M
from dataeff.select.config import SelectConfig
from dataeff.select.distributed_cluster import cluster_pool, near_copy_stats, redundancy_stats
from dataeff.select.manifest import REDUNDANT_CODE, Decisions, decided_reasons, target_count


def run_meddel(
    emb: np.ndarray, keys: np.ndarray | None, quality: pd.DataFrame | None, cfg: SelectConfig, rank: int, world: int
) -> Decisions:
    """MedDEL (PAPERS.md): invalid frames and embedding outliers out, redundancy by bisected eps, exact ratio.

    Args:
        quality: the pool's index rows aligned to ``keys`` (quality statistics may be NaN:
            the quality checks are then skipped), or None. With ``meddel.phash`` or
            ``meddel.near_copies`` its signature columns (``dataeff-shards/3``) feed the copy signals.

    Shape:
        emb: (N, D) float16 unit rows (or this rank's ``LocalRows`` of them), keys: (N,) sorted or None (unread)
        -> decisions for N rows (reasons as :class:`~dataeff.select.manifest.Reasons`, score =
        cosine distance to the own centroid).
    """
    n, mc = len(emb), cfg.meddel
    timings: dict[str, float] = {}
    has_quality = quality is not None and not quality[list(QUALITY_KEYS)].isna().all().all()
    # Every rank holds per-row state for the whole pool: one code byte per row (REASON_CODES,
    # 0 = not dropped) and 4-byte ints; strings are made only when the manifest is written.
    dropped = M.quality_codes(quality, mc) if quality is not None and has_quality else np.zeros(n, np.uint8)
    copies: dict[str, Any] = {}
    signatures = _signatures(quality, n) if mc.phash or mc.near_copies else None  # checked before any work
    if mc.phash:  # our optional copy signal; its thresholds are read only when it is on
        assert signatures is not None
        copies = {"signatures": signatures, "max_distance": mc.phash_max_distance, "min_corr": mc.min_thumb_corr}
    parent: np.ndarray | None = None
    near_info: dict[str, int] = {}
    if mc.near_copies:  # our pool-wide pass: a removed near-copy is out before clustering, like an invalid frame
        assert signatures is not None and quality is not None
        t = time.time()
        sharp = quality["laplacian_var"].to_numpy(np.float64) if has_quality else np.full(n, np.nan)
        parent, near_info = near_copy_stats(
            signatures[1], dropped == 0, sharp, mc.near_copy_min_corr, mc.near_copy_k, rank
        )
        dropped[(parent >= 0) & (dropped == 0)] = REDUNDANT_CODE
        timings["near_copies"] = time.time() - t
    labels, sims, k = cluster_pool(emb, cfg.cluster, cfg.seed, rank, world, timings)
    valid = dropped == 0
    np.copyto(
        dropped, M.embedding_outliers(labels, sims, valid, k, mc.outlier_quantile, mc.min_cluster_size), where=valid
    )
    valid = dropped == 0
    t = time.time()
    m, prev, pos = redundancy_stats(
        emb, labels, sims, valid, k, mc.order, cfg.seed, rank, world, max_scan_rows=mc.max_scan_rows, **copies
    )
    timings["dedup"] = time.time() - t
    t = time.time()
    kept, redundant, info = M.decide(labels, m, pos, valid, target_count(cfg.ratio, n), mc.epsilon)
    del m, pos, valid
    if parent is not None:  # a near-copy is redundant of the row the pass found
        near = dropped == REDUNDANT_CODE
        prev[near] = parent[near]
        del parent, near
    reason = decided_reasons(dropped, kept, redundant, prev)
    timings["ratio_fill"] = time.time() - t
    info.update(
        k=k,
        quality_checks=mc.quality_checks if has_quality else [],
        **({"near_copies": near_info} if mc.near_copies else {}),
        timings_s={a: round(b, 4) for a, b in timings.items()},
    )
    # The score is the cosine distance to the centroid: computed in place (float32, as 1.0 - sims is).
    return Decisions(kept, reason, labels, np.subtract(1.0, sims, out=sims), info)


def _signatures(quality: pd.DataFrame | None, n: int) -> tuple[np.ndarray, np.ndarray]:
    """pHashes and thumbnails of the pool rows from their index columns (``meddel.phash``, ``near_copies``).

    Raises:
        ConfigError: the shard index has no signature columns (written before dataeff-shards/3).

    Shape:
        quality: n index rows aligned to the keys -> phash (n,) uint64, thumbs (n, S, S) uint8.
    """
    if quality is None or not set(SIGNATURE_KEYS) <= set(quality.columns):
        where = ", ".join(sorted(set(quality["shard_dir"]))) if quality is not None and "shard_dir" in quality else ""
        raise ConfigError(
            "meddel.phash=true or meddel.near_copies=true needs the image signatures ({', '.join(SIGNATURE_KEYS)}) of the shard index"
            f"{' of ' + where if where else ''}, written since {SHARDS_FORMAT}; re-shard the raw images with "
            "'dataeff shard ... overwrite=true' and re-embed, or set meddel.phash=false meddel.near_copies=false"
        )
    assert len(quality) == n, "quality rows are aligned to the embedding keys"
    _, phash, thumbs, _ = index_signatures(
        quality["pixel_sha256"].where(quality["pixel_sha256"].notna(), None).tolist(),
        quality["phash"].fillna(0).astype(np.int64).tolist(),
        quality["thumb"].where(quality["thumb"].notna(), None).tolist(),
    )
    return phash, thumbs
