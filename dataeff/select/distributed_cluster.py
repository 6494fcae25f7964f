"""Distributed wrappers of the pure k-means and redundancy cores (``cluster.py``, ``meddel.py``).

k-means is trained once on one rank (:func:`kmeans_rank`) on a seeded sample and its centroids are broadcast;
assignment runs on fixed-size row chunks dealt round-robin over ranks; the per-cluster
redundancy scan (embeddings, and optionally shard-time image signatures) runs on the
clusters a rank owns (balanced by size^2); the optional pool-wide near-copy pass runs
on rank 0 and is broadcast. Every result is
gathered back into pool order, so it is the same on every rank and for any world size.

With ``select.gather=partitioned`` the embeddings arrive as :class:`LocalRows` (each
rank holds only the rows it read) instead of the whole matrix: the k-means sample
rows move to the training rank, each assignment chunk's rows to the rank that assigns it, and
each cluster's rows to the rank that owns it, by all-to-all in rounds of at most
:data:`EXCHANGE_ROWS` rows received per rank (or one cluster, when larger). Every pure core
then sees exactly the rows, in exactly the order, that it sees with the gathered
matrix, so results are bit-identical; only per-row scalars (labels, similarities,
redundancy statistics) are gathered whole, as 4-byte values (:func:`~dataeff.select.cluster.index_dtype`),
and a round's rows are dropped before the next round moves.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

from dataeff import dist
from dataeff.data.signatures import MIN_THUMB_CORR, PHASH_MAX_DISTANCE
from dataeff.select import cluster as C
from dataeff.select.cluster import ClusterConfig
from dataeff.select.meddel import cluster_redundancy
from dataeff.select.near_copies import near_copy_parents

#: Rows a rank receives per exchange round in partitioned mode (48 MiB of float16 at D = 384;
#: a round also holds the copy it sends): a fixed bound on what moves, whatever the pool size.
EXCHANGE_ROWS = 1 << 16


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
        """The rows of the pool rows ``keep`` (N,) bool, renumbered within the kept pool.

        The rows are compacted in place, :data:`EXCHANGE_ROWS` at a time (never a second copy
        of them): this object is not to be used afterwards.
        """
        new_pos = np.cumsum(keep) - 1
        mine = keep[self.pos]
        at = 0
        for a in range(0, len(mine), EXCHANGE_ROWS):  # written at or before where it is read
            block = self.rows[a : a + EXCHANGE_ROWS][mine[a : a + EXCHANGE_ROWS]]
            self.rows[at : at + len(block)] = block
            at += len(block)
        return LocalRows(self.rows[:at], new_pos[self.pos[mine]], int(keep.sum()))


Embeddings = np.ndarray | LocalRows


@dataclass
class Received:
    """The rows one exchange round brought to this rank, as they arrived (no sorted copy).

    Shape:
        pos: (m,) their pool positions, ascending; at: (m,) the row of ``rows`` at each;
        rows: (m, D) float16.
    """

    pos: np.ndarray
    at: np.ndarray
    rows: np.ndarray

    def take(self, want: np.ndarray) -> np.ndarray:
        """The received rows at pool positions ``want`` (all received), in that order."""
        return self.rows[self.at[np.searchsorted(self.pos, want)]]


def exchange_rounds(local: LocalRows, dest: np.ndarray, rnd: np.ndarray, n_rounds: int) -> Iterator[Received]:
    """Move local rows to other ranks in rounds; yields what this rank received per round.

    Every rank must iterate all ``n_rounds`` rounds (each is a collective). A round sends
    one copy of its rows and receives into one buffer; a caller that drops the yielded
    rows before asking for the next round holds one round at a time.

    Shape:
        dest, rnd: (n_local,) destination rank and round of each local row (rnd -1 = not
        sent) -> per round: :class:`Received`.
    """
    world = dist.world_size()
    # By round, then destination; -world..-1: not sent. 4-byte while the slots fit.
    slot = rnd.astype(C.index_dtype((n_rounds + 1) * world)) * world + dest
    del dest, rnd  # a caller that passed temporaries has them freed before the sort
    order = np.argsort(slot, kind="stable").astype(C.index_dtype(len(slot)))  # receivers sort by position
    starts = np.concatenate([[0], np.cumsum(np.bincount(slot + world, minlength=(n_rounds + 1) * world))])
    del slot
    return _rounds(local, order, starts[world:], n_rounds, world)  # the plan only


def _rounds(local: LocalRows, order: np.ndarray, bounds: np.ndarray, n_rounds: int, world: int) -> Iterator[Received]:
    for r in range(n_rounds):
        send = order[bounds[r * world] : bounds[(r + 1) * world]]  # grouped by destination
        counts = np.diff(bounds[r * world : (r + 1) * world + 1]).tolist()
        pos = dist.all_to_all_rows(local.pos[send], counts)
        rows = dist.all_to_all_rows(local.rows[send], counts)
        at = np.argsort(pos, kind="stable")
        yield Received(pos[at], at, rows)
        del pos, rows, at  # not held while the next round moves


def kmeans_rank(world: int) -> int:
    """The rank that trains k-means: the last one, so that its float32 sample stays off rank 0,
    which writes the manifest (at the same ``cluster.threads`` any rank gives the same centroids)."""
    return world - 1


def _sample_rows(emb: Embeddings, sample: np.ndarray, rank: int, trainer: int) -> np.ndarray | None:
    """The k-means sample rows (pool order) as float32 on rank ``trainer``; None elsewhere.

    Converted :data:`EXCHANGE_ROWS` rows at a time; partitioned, they also move to the
    trainer in rounds of that many, so it holds the float32 sample plus one round of rows.

    Shape:
        sample: (M,) ascending pool rows -> (M, D) float32.
    """
    step = EXCHANGE_ROWS
    if isinstance(emb, np.ndarray):
        if rank != trainer:
            return None
        out = np.empty((len(sample), emb.shape[1]), np.float32)
        for a in range(0, len(sample), step):
            out[a : a + step] = emb[sample[a : a + step]]
        return out
    at = np.minimum(np.searchsorted(sample, emb.pos), len(sample) - 1)  # sample index of each local row
    rnd = np.where(sample[at] == emb.pos, at // step, -1).astype(np.int32)
    del at
    plan = exchange_rounds(emb, np.full(len(emb.pos), trainer, np.int32), rnd, -(-len(sample) // step))
    del rnd
    x = np.empty((len(sample), emb.rows.shape[1]), np.float32) if rank == trainer else None
    for r, got in enumerate(plan):
        if x is not None:
            x[r * step : (r + 1) * step] = got.take(sample[r * step : (r + 1) * step])
        del got  # not held while the next round moves
    return x


def _assign_owned(emb: Embeddings, centroids: np.ndarray, rank: int, world: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Assignment of the chunks this rank owns, each computed on exactly its chunk's rows."""
    bounds = C.chunk_bounds(len(emb))
    owned = C.owned_chunks(len(bounds), rank, world)
    if isinstance(emb, np.ndarray):
        return [C.assign(emb[s:e], centroids) for s, e in (bounds[c] for c in owned)]
    per_round = max(1, EXCHANGE_ROWS // C.ASSIGN_CHUNK)  # chunks a rank assigns per round
    chunk = (emb.pos // C.ASSIGN_CHUNK).astype(C.index_dtype(len(bounds)))
    n_rounds = -(-len(C.owned_chunks(len(bounds), 0, world)) // per_round)
    plan = exchange_rounds(emb, chunk % world, (chunk // world) // per_round, n_rounds)
    del chunk
    parts = []
    for r, got in enumerate(plan):
        for c in owned[r * per_round : (r + 1) * per_round]:
            parts.append(C.assign(got.take(np.arange(*bounds[c])), centroids))
        del got  # not held while the next round moves
    return parts


def cluster_pool(
    emb: Embeddings, cfg: ClusterConfig, seed: int, rank: int, world: int, timings: dict[str, float]
) -> tuple[np.ndarray, np.ndarray, int]:
    """k-means trained once on :func:`kmeans_rank` (seeded sample), centroids broadcast, chunks assigned per rank.

    Args:
        timings: receives ``kmeans`` and ``assign`` wall seconds.

    Shape:
        emb: (N, D) float16 unit rows, key-sorted, or this rank's :class:`LocalRows` of them
        -> labels (N,) int32 (int64 past 2^31 clusters), sims (N,) float32, k.
    """
    n = len(emb)
    k = C.resolve_k(n, cfg.k)
    use_gpu = cfg.device == "gpu" or (cfg.device == "auto" and C.gpu_available())
    t = time.time()
    centroids, trainer = None, kmeans_rank(world)
    sample_rows = _sample_rows(emb, C.kmeans_sample(n, k, cfg.max_points_per_centroid, seed), rank, trainer)
    if sample_rows is not None:
        centroids = C.train_kmeans(sample_rows, k, cfg.niter, seed, use_gpu, cfg.threads)
    del sample_rows
    centroids = dist.broadcast_array(centroids, src=trainer)
    timings["kmeans"] = time.time() - t
    t = time.time()
    with C.thread_limit(cfg.threads, "blas"):  # products round differently with the thread count
        parts = _assign_owned(emb, centroids, rank, world)
    labels = np.concatenate([p[0].astype(C.index_dtype(k)) for p in parts]) if parts else np.zeros(0, C.index_dtype(k))
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
        uint8) -> m (N,) float32 (+inf for invalid rows), prev (N,) row of the duplicated
        earlier member (-1), pos (N,) visit position in its cluster; both int32 (int64 from 2^31 rows).
    """
    n = len(emb)
    members = C.members_by_cluster(np.where(valid, labels, -1), k)
    owned = C.partition_clusters(np.array([len(r) for r in members], dtype=np.int64), world)
    m_l, prev_l, pos_l = [np.zeros(0, np.float32)], [np.zeros(0, C.index_dtype(n))], [np.zeros(0, C.index_dtype(n))]
    # Per-cluster products are small: BLAS threads only add start-up and, on a busy node,
    # spin-wait cost (measured 25x on 141-member clusters); parallelism comes from ranks.
    with C.thread_limit(1, "blas"):
        for batch, rows_of in _owned_cluster_rows(emb, labels, valid, members, owned, rank, world):
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
                m_l.append(m)
                prev_l.append(np.where(prev >= 0, rows[np.maximum(prev, 0)], -1).astype(rows.dtype, copy=False))
                pos_l.append(pos.astype(rows.dtype))
            del rows_of  # this round's rows are not held while the next round moves
    # Every rank knows which clusters each rank scanned, in which order: only the statistics
    # travel, one at a time, each freed here once gathered.
    stats = []
    for local, fill in ((m_l, np.inf), (prev_l, -1), (pos_l, 0)):
        parts = dist.all_gather_array(np.concatenate(local))
        local.clear()
        full = np.full(n, fill, dtype=parts[0].dtype)
        for part, clusters in zip(parts, owned, strict=True):
            at = 0
            for c in clusters:
                full[members[c]] = part[at : at + len(members[c])]
                at += len(members[c])
        stats.append(full)
        del parts
    m_full, prev_full, pos_full = stats
    return m_full, prev_full, pos_full


def _owned_cluster_rows(
    emb: Embeddings,
    labels: np.ndarray,
    valid: np.ndarray,
    members: list[np.ndarray],
    owned: list[np.ndarray],
    rank: int,
    world: int,
) -> Iterator[tuple[np.ndarray, Callable[[np.ndarray], np.ndarray]]]:
    """Batches of this rank's clusters (``owned[rank]``, in id order), each with a lookup of pool rows -> embeddings.

    Gathered: one batch, the matrix itself. Partitioned: every rank's owned clusters are
    cut (in id order) into batches of at most :data:`EXCHANGE_ROWS` member rows (or one
    cluster), batch i of every rank moves in round i, so a rank holds its own rows plus
    one batch. Only the ``valid`` rows (the members) move.
    """
    if isinstance(emb, np.ndarray):
        yield owned[rank], emb.__getitem__
        return
    sizes = np.array([len(r) for r in members], dtype=np.int64)
    owner, rnd = np.zeros(len(members), np.int32), np.full(len(members), -1, np.int32)
    batches: list[list[np.ndarray]] = []
    budget = max(EXCHANGE_ROWS, int(sizes.max(initial=1)))
    for r, clusters in enumerate(owned):
        owner[clusters], b, used = r, 0, 0
        for c in clusters:  # a new batch when this cluster would overflow the current one
            if used and used + sizes[c] > budget:
                b, used = b + 1, 0
            rnd[c], used = b, used + int(sizes[c])
        batches.append([clusters[rnd[clusters] == i] for i in range(int(rnd[clusters].max(initial=-1)) + 1)])
    mine = np.where(valid[emb.pos], labels[emb.pos], -1)  # the cluster of each local row that moves
    n_rounds = max(len(b) for b in batches)
    rounds = exchange_rounds(
        emb, owner[np.maximum(mine, 0)], np.where(mine >= 0, rnd[np.maximum(mine, 0)], -1), n_rounds
    )
    del mine
    for i, got in enumerate(rounds):
        yield batches[rank][i] if i < len(batches[rank]) else np.zeros(0, np.int64), got.take
        del got  # not held while the next round moves
