"""Spherical k-means with faiss, nearest-centroid assignment, work partitioning.

Pure functions over numpy arrays (no I/O, no collectives); the distributed wrapper
beside it (``distributed_cluster.py``) trains k-means once (rank 0), broadcasts the
centroids, assigns fixed-size row chunks round-robin over ranks and partitions
clusters over ranks for the per-cluster work. Every result here depends only on the
(key-sorted) input rows, never on the number of ranks: chunk boundaries are fixed,
the k-means sample is drawn with a seeded generator, ties go to the lowest index.
"""

from __future__ import annotations

import contextlib
import math
from contextlib import AbstractContextManager
from dataclasses import dataclass
from types import ModuleType

import numpy as np
from threadpoolctl import threadpool_limits

from dataeff.config import ConfigError, option

#: Rows per assignment chunk; fixed so that every chunk is computed identically on any rank.
ASSIGN_CHUNK = 32768
CLUSTER_DEVICES = ("auto", "cpu", "gpu")


@dataclass
class ClusterConfig:
    """Spherical k-means (faiss) shared by the clustering methods."""

    k: int = option(0, help="clusters; 0 = round(sqrt(N)), at least 2 (PAPERS.md MedDEL step 2)")
    niter: int = option(100, help="k-means iterations (PAPERS.md: about 100)")
    max_points_per_centroid: int = option(256, help="k-means trains on at most k * this many seeded-sampled points")
    device: str = option("auto", help="'auto' = faiss GPU index when faiss sees a GPU, else CPU; or 'cpu', 'gpu'")
    threads: int = option(
        0,
        help="CPU threads k-means trains and assigns with; 0 = the process's OpenMP setting (torchrun: 1 per rank, a plain "
        "process: every core). The centroids' last bits depend on it: set it to compare runs launched differently",
    )

    def __post_init__(self) -> None:
        if self.k < 0 or self.niter < 1 or self.max_points_per_centroid < 1 or self.threads < 0:
            raise ConfigError(
                "cluster.k must be >= 0 (0 = sqrt(N)); cluster.niter and cluster.max_points_per_centroid >= 1; "
                "cluster.threads >= 0 (0 = the process's setting)"
            )
        if self.device not in CLUSTER_DEVICES:
            raise ConfigError(f"cluster.device={self.device!r}: choose auto, cpu or gpu")


def default_k(n: int) -> int:
    """Number of clusters when the config leaves it at 0: round(sqrt(N)), at least 2.

    PAPERS.md (MedDEL step 2): "k configurable (default about sqrt(N), at least 2)".
    """
    return max(2, int(round(math.sqrt(max(n, 0)))))


def resolve_k(n: int, k: int) -> int:
    """The k to use for ``n`` points (``k <= 0`` = :func:`default_k`).

    Raises:
        ConfigError: when there are fewer than 2 points or ``k > n``.
    """
    if n < 2:
        raise ConfigError(f"the pool has {n} sample(s): clustering needs at least 2")
    k = default_k(n) if k <= 0 else k
    if k > n:
        raise ConfigError(f"cluster.k={k} is larger than the pool (N={n}): set cluster.k <= {n} or 0 (= sqrt(N))")
    return k


def import_faiss(purpose: str = "k-means clustering") -> ModuleType:
    """The ``faiss`` module, imported on first use.

    faiss is an extra (``dataeff[cpu]`` or ``dataeff[gpu]``: two builds of one module, so
    neither can be a base dependency); importing it here rather than at module level keeps
    ``dataeff select --help`` and ``method=random``/``full`` working without it.

    Raises:
        ConfigError: when faiss is not installed, naming the extras that bring it.
    """
    try:
        import faiss
    except ImportError:
        raise ConfigError(
            f"{purpose} needs faiss, which is not installed: install dataeff[cpu] or dataeff[gpu] "
            "(pip install 'dataeff[cpu]'), or pick a method that does not cluster (method=random or full)"
        ) from None
    return faiss


def gpu_available() -> bool:
    """True when the installed faiss build sees a GPU."""
    faiss = import_faiss()
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def kmeans_sample(n: int, k: int, max_points_per_centroid: int, seed: int) -> np.ndarray:
    """Sorted indices of the points k-means trains on (all when ``n <= k * max_points_per_centroid``).

    Sampling here (rather than inside faiss) keeps the float32 copy small: callers
    convert only the sampled rows from float16.
    """
    cap = k * max_points_per_centroid
    if n <= cap:
        return np.arange(n)
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(n, size=cap, replace=False))


def train_kmeans(x: np.ndarray, k: int, niter: int, seed: int, use_gpu: bool = False, threads: int = 0) -> np.ndarray:
    """Spherical k-means centroids (unit norm) of the rows of ``x``.

    ``threads`` > 0: the threads faiss trains with (:func:`thread_limit`). Its products round
    differently with the thread count, so the centroids (and a manifest) are reproducible at
    a fixed count: measured at 256k x 64, 1 vs 2 threads moved centroids by up to 2e-3 and 330
    of 1M keep decisions.

    Shape:
        x: (M, D) float32, L2-normalised rows -> (k, D) float32.
    """
    faiss = import_faiss()
    x = np.ascontiguousarray(x, dtype=np.float32)
    km = faiss.Kmeans(
        x.shape[1],
        k,
        niter=niter,
        seed=seed,
        spherical=True,
        gpu=bool(use_gpu),
        verbose=False,
        # The caller already subsampled (kmeans_sample); stop faiss from sampling again.
        max_points_per_centroid=max(1, -(-x.shape[0] // k)),
        min_points_per_centroid=1,
    )
    with thread_limit(threads):
        km.train(x)
    assert km.centroids is not None, "faiss.Kmeans.train sets the centroids"
    c = km.centroids.astype(np.float32)
    return c / np.maximum(np.linalg.norm(c, axis=1, keepdims=True), 1e-12)


def assign(x: np.ndarray, centroids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Nearest centroid by cosine similarity (ties -> lowest centroid id).

    Shape:
        x: (M, D) float16/float32 unit rows, centroids: (k, D) -> labels (M,) int64, sims (M,) float32.
    """
    sims = np.asarray(x, dtype=np.float32) @ centroids.T
    labels = sims.argmax(axis=1)
    return labels.astype(np.int64), sims[np.arange(len(labels)), labels].astype(np.float32)


def chunk_bounds(n: int, chunk: int = ASSIGN_CHUNK) -> list[tuple[int, int]]:
    """[start, stop) of each fixed-size row chunk of ``n`` rows."""
    return [(s, min(s + chunk, n)) for s in range(0, n, chunk)]


def owned_chunks(n_chunks: int, rank: int, world_size: int) -> list[int]:
    """Chunk ids rank ``rank`` assigns: i % world_size == rank."""
    return list(range(rank, n_chunks, world_size))


def reorder_chunks(parts: list[np.ndarray], n: int, chunk: int = ASSIGN_CHUNK) -> np.ndarray:
    """Put per-rank concatenations of owned chunks (as gathered, rank order) back in row order."""
    world = len(parts)
    bounds = chunk_bounds(n, chunk)
    out = np.empty((n,) + parts[0].shape[1:], dtype=parts[0].dtype)
    for r, part in enumerate(parts):
        pos = 0
        for c in owned_chunks(len(bounds), r, world):
            s, e = bounds[c]
            out[s:e] = part[pos : pos + e - s]
            pos += e - s
        assert pos == len(part), "gathered chunk sizes do not match the chunk plan"
    return out


def partition_clusters(sizes: np.ndarray, world_size: int) -> list[np.ndarray]:
    """Split cluster ids over ranks with balanced pairwise work (sum of size^2).

    Greedy longest-processing-time: clusters by decreasing cost (ties by id) go to
    the least loaded rank (ties by rank id) — deterministic for given sizes.

    Shape:
        sizes: (k,) int -> world_size arrays of cluster ids, each sorted.
    """
    cost = sizes.astype(np.float64) ** 2
    order = np.lexsort((np.arange(len(sizes)), -cost))
    load = np.zeros(world_size)
    owned: list[list[int]] = [[] for _ in range(world_size)]
    for c in order:
        r = int(np.argmin(load))
        owned[r].append(int(c))
        load[r] += cost[c]
    return [np.array(sorted(o), dtype=np.int64) for o in owned]


def thread_limit(n: int, user_api: str | None = None) -> AbstractContextManager[object]:
    """At most ``n`` threads in the loaded OpenMP and BLAS libraries (``user_api``: only
    ``"blas"`` or ``"openmp"``) while the context is open, restored after; 0 = unchanged.

    threadpoolctl finds every loaded copy, faiss's own OpenMP and BLAS included.
    """
    return threadpool_limits(n, user_api=user_api) if n else contextlib.nullcontext()


def index_dtype(n: int) -> type[np.signedinteger]:
    """int32 for indices below ``n`` < 2^31 (and -1), else int64: whole-pool index arrays at 4 bytes a row."""
    return np.int32 if n < 2**31 else np.int64


def members_by_cluster(labels: np.ndarray, k: int) -> list[np.ndarray]:
    """Row indices of each cluster, ascending.

    Shape:
        labels: (N,) int in [0, k) or -1 (ignored) -> k arrays of :func:`index_dtype` (N).
    """
    order = np.argsort(labels, kind="stable").astype(index_dtype(len(labels)))
    sorted_labels = labels[order]
    starts = np.searchsorted(sorted_labels, np.arange(k), side="left")
    stops = np.searchsorted(sorted_labels, np.arange(k), side="right")
    return [order[s:e] for s, e in zip(starts, stops, strict=False)]
