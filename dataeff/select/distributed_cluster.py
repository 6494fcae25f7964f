"""Distributed wrappers of the pure k-means and redundancy cores (``cluster.py``, ``meddel.py``).

k-means is trained once on rank 0 on a seeded sample and its centroids are broadcast;
assignment runs on fixed-size row chunks dealt round-robin over ranks; the per-cluster
redundancy scan (embeddings, and optionally shard-time image signatures) runs on the
clusters a rank owns (balanced by size^2); the optional pool-wide near-copy pass runs
on rank 0 and is broadcast. Every result is
gathered back into pool order, so it is the same on every rank and for any world size.

With ``select.gather=partitioned`` the embeddings arrive as :class:`LocalRows` (each
rank holds only the rows it read) instead of the whole matrix: the k-means sample
rows move to rank 0, each assignment chunk's rows to the rank that assigns it, and
each cluster's rows to the rank that owns it, by all-to-all in rounds of at most
:data:`EXCHANGE_ROWS` rows received per rank (or one cluster, when larger). Every pure core
then sees exactly the rows, in exactly the order, that it sees with the gathered
matrix, so results are bit-identical; only per-row scalars (labels, similarities,
redundancy statistics) are gathered whole.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass

import numpy as np

from dataeff import dist
from dataeff.data.signatures import MIN_THUMB_CORR, PHASH_MAX_DISTANCE
from dataeff.select import cluster as C
from dataeff.select.cluster import ClusterConfig
from dataeff.select.meddel import cluster_redundancy
from dataeff.select.near_copies import near_copy_parents

#: Rows a rank receives per exchange round in partitioned mode (~200 MB of float16 at D = 384).
EXCHANGE_ROWS = 1 << 18


@dataclass
class LocalRows:
    """This rank's share of a pool too large to gather (``select.gather=partitioned``).

    Shape:
        rows: (n_local, D) float16 unit rows; pos: (n_local,) int64 distinct positions of
        those rows in the key-sorted pool of ``n`` rows (any order).
    """

    rows: np.ndarray
    pos: np.ndarray
    n: int

    def __len__(self) -> int:
        return self.n

    def subset(self, keep: np.ndarray) -> LocalRows:
        """The rows of the pool rows ``keep`` (N,) bool, renumbered within the kept pool."""
        new_pos = np.cumsum(keep) - 1
        mine = keep[self.pos]
        return LocalRows(self.rows[mine], new_pos[self.pos[mine]], int(keep.sum()))


Embeddings = np.ndarray | LocalRows


def exchange_rounds(
    local: LocalRows, dest: np.ndarray, rnd: np.ndarray, n_rounds: int
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Move local rows to other ranks in rounds; yields what this rank received per round.

    Every rank must iterate all ``n_rounds`` rounds (each is a collective).

    Shape:
        dest, rnd: (n_local,) destination rank and round of each local row (rnd -1 = not
        sent) -> per round: positions (m,) ascending, rows (m, D) float16 in that order.
    """
    world = dist.world_size()
    order = np.lexsort((local.pos, dest, rnd))
    keys = rnd[order] * world + dest[order]
    bounds = np.searchsorted(keys, np.arange(n_rounds * world + 1))
    for r in range(n_rounds):
        slices = [order[bounds[r * world + d] : bounds[r * world + d + 1]] for d in range(world)]
        pos = np.concatenate(dist.all_to_all_arrays([local.pos[i] for i in slices]))
        rows = np.concatenate(dist.all_to_all_arrays([local.rows[i] for i in slices]))
        by_pos = np.argsort(pos, kind="stable")
        yield pos[by_pos], rows[by_pos]


def _sample_rows(emb: Embeddings, sample: np.ndarray, rank: int) -> np.ndarray | None:
    """The k-means sample rows (pool order) on rank 0; None elsewhere."""
    if isinstance(emb, np.ndarray):
        return emb[sample] if rank == 0 else None
    wanted = np.zeros(emb.n, bool)
    wanted[sample] = True
    rnd = np.where(wanted[emb.pos], 0, -1)
    (_, rows), *_ = exchange_rounds(emb, np.zeros(len(emb.pos), np.int64), rnd, 1)
    return rows if rank == 0 else None


def _assign_owned(emb: Embeddings, centroids: np.ndarray, rank: int, world: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Assignment of the chunks this rank owns, each computed on exactly its chunk's rows."""
    bounds = C.chunk_bounds(len(emb))
    owned = C.owned_chunks(len(bounds), rank, world)
    if isinstance(emb, np.ndarray):
        return [C.assign(emb[s:e], centroids) for s, e in (bounds[c] for c in owned)]
    per_round = max(1, EXCHANGE_ROWS // C.ASSIGN_CHUNK)  # chunks a rank assigns per round
    chunk = emb.pos // C.ASSIGN_CHUNK
    n_rounds = -(-len(C.owned_chunks(len(bounds), 0, world)) // per_round)
    parts = []
    for r, (pos, rows) in enumerate(exchange_rounds(emb, chunk % world, (chunk // world) // per_round, n_rounds)):
        for c in owned[r * per_round : (r + 1) * per_round]:
            s, e = bounds[c]
            a, b = np.searchsorted(pos, [s, e])
            parts.append(C.assign(rows[a:b], centroids))
    return parts


def cluster_pool(
    emb: Embeddings, cfg: ClusterConfig, seed: int, rank: int, world: int, timings: dict[str, float]
) -> tuple[np.ndarray, np.ndarray, int]:
    """k-means trained once on rank 0 (seeded sample), centroids broadcast, chunks assigned per rank.

    Args:
        timings: receives ``kmeans`` and ``assign`` wall seconds.

    Shape:
        emb: (N, D) float16 unit rows, key-sorted, or this rank's :class:`LocalRows` of them
        -> labels (N,) int64, sims (N,) float32, k.
    """
    n = len(emb)
    k = C.resolve_k(n, cfg.k)
    use_gpu = cfg.device == "gpu" or (cfg.device == "auto" and C.gpu_available())
    t = time.time()
    centroids = None
    sample_rows = _sample_rows(emb, C.kmeans_sample(n, k, cfg.max_points_per_centroid, seed), rank)
    if sample_rows is not None:
        centroids = C.train_kmeans(sample_rows.astype(np.float32), k, cfg.niter, seed, use_gpu)
    del sample_rows
    centroids = dist.broadcast_array(centroids)
    timings["kmeans"] = time.time() - t
    t = time.time()
    parts = _assign_owned(emb, centroids, rank, world)
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
    emb: Embeddings,
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
    max_scan_rows: int = 0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-cluster redundancy (clusters partitioned over ranks), gathered into pool arrays.

    Args:
        signatures: pool pHashes and thumbnails for MedDEL's optional copy signal
            (:func:`~dataeff.select.meddel.cluster_redundancy`); None = embeddings only.
        max_scan_rows: leaf bound of the scan (``meddel.max_scan_rows``); 0 = exact (SemDeDup).

    Shape:
        emb: (N, D) float16 or this rank's :class:`LocalRows`, labels/sims/valid: (N,), signatures: ((N,) uint64, (N, S, S)
        uint8) -> m (N,) float32 (+inf for invalid rows), prev (N,) int64 row of the
        duplicated earlier member (-1), pos (N,) int64 visit position in its cluster.
    """
    n = len(emb)
    members = C.members_by_cluster(np.where(valid, labels, -1), k)
    rows_l, m_l, prev_l, pos_l = (
        [np.zeros(0, np.int64)],
        [np.zeros(0, np.float32)],
        [np.zeros(0, np.int64)],
        [np.zeros(0, np.int64)],
    )
    # Per-cluster products are small: BLAS threads only add start-up and, on a busy node,
    # spin-wait cost (measured 25x on 141-member clusters); parallelism comes from ranks.
    with _single_blas_thread():
        for batch, rows_of in _owned_cluster_rows(emb, members, rank, world):
            for c in batch:
                rows = members[c]
                if len(rows) == 0:
                    continue
                sig = None if signatures is None else (signatures[0][rows], signatures[1][rows])
                m, prev, pos = cluster_redundancy(
                    rows_of(rows).astype(np.float32),
                    sims[rows],
                    order,
                    seed,
                    int(c),
                    sig,
                    max_distance,
                    min_corr,
                    max_scan_rows,
                )
                rows_l.append(rows)
                m_l.append(m)
                prev_l.append(np.where(prev >= 0, rows[np.maximum(prev, 0)], -1))
                pos_l.append(pos)
    rows, m, prev, pos = (dist.all_gather_concat(np.concatenate(x)) for x in (rows_l, m_l, prev_l, pos_l))
    m_full, prev_full, pos_full = np.full(n, np.inf, np.float32), np.full(n, -1, np.int64), np.zeros(n, np.int64)
    m_full[rows], prev_full[rows], pos_full[rows] = m, prev, pos
    return m_full, prev_full, pos_full


def _owned_cluster_rows(
    emb: Embeddings, members: list[np.ndarray], rank: int, world: int
) -> Iterator[tuple[np.ndarray, Callable[[np.ndarray], np.ndarray]]]:
    """Batches of this rank's clusters (balanced by size^2), each with a lookup of pool rows -> embeddings.

    Gathered: one batch, the matrix itself. Partitioned: every rank's owned clusters are
    cut (in id order) into batches of at most :data:`EXCHANGE_ROWS` member rows (or one
    cluster), batch i of every rank moves in round i, so a rank holds its own rows plus
    one batch.
    """
    sizes = np.array([len(r) for r in members], dtype=np.int64)
    owned = C.partition_clusters(sizes, world)
    if isinstance(emb, np.ndarray):
        yield owned[rank], lambda rows: emb[rows]
        return
    owner, rnd = np.zeros(len(members), np.int64), np.full(len(members), -1, np.int64)
    batches: list[list[np.ndarray]] = []
    budget = max(EXCHANGE_ROWS, int(sizes.max(initial=1)))
    for r, clusters in enumerate(owned):
        owner[clusters], b, used = r, 0, 0
        for c in clusters:  # a new batch when this cluster would overflow the current one
            if used and used + sizes[c] > budget:
                b, used = b + 1, 0
            rnd[c], used = b, used + int(sizes[c])
        batches.append([clusters[rnd[clusters] == i] for i in range(int(rnd[clusters].max(initial=-1)) + 1)])
    label = np.full(emb.n, -1, np.int64)
    for c, rows in enumerate(members):
        label[rows] = c
    mine = label[emb.pos]
    rnd_rows = np.where(mine >= 0, rnd[np.maximum(mine, 0)], -1)
    n_rounds = max(len(b) for b in batches)
    for i, (pos, rows) in enumerate(exchange_rounds(emb, owner[np.maximum(mine, 0)], rnd_rows, n_rounds)):
        batch = batches[rank][i] if i < len(batches[rank]) else np.zeros(0, np.int64)
        yield batch, _lookup(pos, rows)


def _lookup(pos: np.ndarray, rows: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
    """Pool rows -> their embeddings among received ``rows`` at ascending positions ``pos``."""
    return lambda want: rows[np.searchsorted(pos, want)]


def _single_blas_thread() -> AbstractContextManager[object]:
    """Limit numpy's BLAS to one thread (threadpoolctl, installed with scikit-learn), else no-op."""
    try:  # optional dependency: imported here so that dataeff runs without it
        from threadpoolctl import threadpool_limits
    except ImportError:
        return contextlib.nullcontext()
    return threadpool_limits(1, user_api="blas")
