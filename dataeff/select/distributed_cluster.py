"""Distributed wrappers of the pure k-means and redundancy cores (``cluster.py``, ``meddel.py``).

k-means is trained once on rank 0 on a seeded sample and its centroids are broadcast;
assignment runs on fixed-size row chunks dealt round-robin over ranks; the per-cluster
redundancy scan (embeddings, and optionally shard-time image signatures) runs on the
clusters a rank owns (balanced by size^2); the optional pool-wide near-copy pass runs
on rank 0 and is broadcast. Every result is
gathered back into pool order, so it is the same on every rank and for any world size.
"""

from __future__ import annotations

import contextlib
import time
from contextlib import AbstractContextManager

import numpy as np

from dataeff import dist
from dataeff.data.signatures import MIN_THUMB_CORR, PHASH_MAX_DISTANCE
from dataeff.select import cluster as C
from dataeff.select.cluster import ClusterConfig
from dataeff.select.meddel import cluster_redundancy
from dataeff.select.near_copies import near_copy_parents


def cluster_pool(
    emb: np.ndarray, cfg: ClusterConfig, seed: int, rank: int, world: int, timings: dict[str, float]
) -> tuple[np.ndarray, np.ndarray, int]:
    """k-means trained once on rank 0 (seeded sample), centroids broadcast, chunks assigned per rank.

    Args:
        timings: receives ``kmeans`` and ``assign`` wall seconds.

    Shape:
        emb: (N, D) float16 unit rows, key-sorted -> labels (N,) int64, sims (N,) float32, k.
    """
    n = len(emb)
    k = C.resolve_k(n, cfg.k)
    use_gpu = cfg.device == "gpu" or (cfg.device == "auto" and C.gpu_available())
    t = time.time()
    centroids = None
    if rank == 0:
        sample = C.kmeans_sample(n, k, cfg.max_points_per_centroid, seed)
        centroids = C.train_kmeans(emb[sample].astype(np.float32), k, cfg.niter, seed, use_gpu)
    centroids = dist.broadcast_array(centroids)
    timings["kmeans"] = time.time() - t
    t = time.time()
    bounds = C.chunk_bounds(n)
    parts = [C.assign(emb[s:e], centroids) for s, e in (bounds[c] for c in C.owned_chunks(len(bounds), rank, world))]
    labels = np.concatenate([p[0] for p in parts]) if parts else np.zeros(0, np.int64)
    sims = np.concatenate([p[1] for p in parts]) if parts else np.zeros(0, np.float32)
    labels = C.reorder_chunks(dist.all_gather_array(labels), n)
    sims = C.reorder_chunks(dist.all_gather_array(sims), n)
    timings["assign"] = time.time() - t
    return labels, sims, k


def near_copy_stats(
    thumbs: np.ndarray, valid: np.ndarray, sharpness: np.ndarray, min_corr: float, k: int, rank: int
) -> tuple[np.ndarray, dict[str, int]]:
    """MedDEL's pool-wide near-copy pass (:func:`~dataeff.select.near_copies.near_copy_parents`), run once.

    Rank 0 computes it over the gathered pool arrays and broadcasts the result, so every
    rank (and every world size) gets the same groups whatever faiss's threading does.

    Shape:
        thumbs: (N, S, S) uint8, valid, sharpness: (N,) -> parent (N,) int64 (-1 = not removed), counts.
    """
    names = ("candidate_pairs", "confirmed_pairs", "groups", "removed")
    packed = None
    if rank == 0:
        parent, info = near_copy_parents(thumbs, valid, sharpness, min_corr, k)
        packed = np.concatenate([parent, np.array([info[a] for a in names], dtype=np.int64)])
    packed = dist.broadcast_array(packed)
    return packed[: len(thumbs)], {a: int(v) for a, v in zip(names, packed[len(thumbs) :], strict=True)}


def redundancy_stats(
    emb: np.ndarray,
    labels: np.ndarray,
    sims: np.ndarray,
    valid: np.ndarray,
    k: int,
    order: str,
    seed: int,
    rank: int,
    world: int,
    signatures: tuple[np.ndarray, np.ndarray] | None = None,
    max_distance: int = PHASH_MAX_DISTANCE,
    min_corr: float = MIN_THUMB_CORR,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-cluster redundancy (clusters partitioned over ranks), gathered into pool arrays.

    Args:
        signatures: pool pHashes and thumbnails for MedDEL's optional copy signal
            (:func:`~dataeff.select.meddel.cluster_redundancy`); None = embeddings only.

    Shape:
        emb: (N, D) float16, labels/sims/valid: (N,), signatures: ((N,) uint64, (N, S, S)
        uint8) -> m (N,) float32 (+inf for invalid rows), prev (N,) int64 row of the
        duplicated earlier member (-1), pos (N,) int64 visit position in its cluster.
    """
    n = len(emb)
    members = C.members_by_cluster(np.where(valid, labels, -1), k)
    owned = C.partition_clusters(np.array([len(r) for r in members]), world)[rank]
    rows_l, m_l, prev_l, pos_l = (
        [np.zeros(0, np.int64)],
        [np.zeros(0, np.float32)],
        [np.zeros(0, np.int64)],
        [np.zeros(0, np.int64)],
    )
    # Per-cluster products are small: BLAS threads only add start-up and, on a busy node,
    # spin-wait cost (measured 25x on 141-member clusters); parallelism comes from ranks.
    with _single_blas_thread():
        for c in owned:
            rows = members[c]
            if len(rows) == 0:
                continue
            sig = None if signatures is None else (signatures[0][rows], signatures[1][rows])
            m, prev, pos = cluster_redundancy(
                emb[rows].astype(np.float32), sims[rows], order, seed, int(c), sig, max_distance, min_corr
            )
            rows_l.append(rows)
            m_l.append(m)
            prev_l.append(np.where(prev >= 0, rows[np.maximum(prev, 0)], -1))
            pos_l.append(pos)
    rows, m, prev, pos = (dist.all_gather_concat(np.concatenate(x)) for x in (rows_l, m_l, prev_l, pos_l))
    m_full, prev_full, pos_full = np.full(n, np.inf, np.float32), np.full(n, -1, np.int64), np.zeros(n, np.int64)
    m_full[rows], prev_full[rows], pos_full[rows] = m, prev, pos
    return m_full, prev_full, pos_full


def _single_blas_thread() -> AbstractContextManager[object]:
    """Limit numpy's BLAS to one thread (threadpoolctl, installed with scikit-learn), else no-op."""
    try:  # optional dependency: imported here so that dataeff runs without it
        from threadpoolctl import threadpool_limits
    except ImportError:
        return contextlib.nullcontext()
    return threadpool_limits(1, user_api="blas")
