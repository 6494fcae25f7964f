"""Unit tests for dataeff.select.cluster: k rule, seeded spherical k-means, chunked assignment, partitions."""

import numpy as np
import pytest

from dataeff.config import ConfigError
from dataeff.select import cluster as C


def blobs(n_per=50, centres=4, dim=16, noise=0.05, seed=0):
    rng = np.random.default_rng(seed)
    c = rng.normal(size=(centres, dim))
    x = np.repeat(c, n_per, axis=0) + noise * rng.normal(size=(centres * n_per, dim)) * np.linalg.norm(c, axis=1).mean()
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x.astype(np.float32), np.repeat(np.arange(centres), n_per)


def test_default_k_is_about_sqrt_n_and_at_least_two():
    assert C.default_k(1) == 2
    assert C.default_k(100) == 10
    assert C.default_k(1_000_000) == 1000


def test_resolve_k_rejects_k_larger_than_n_and_tiny_pools():
    assert C.resolve_k(100, 0) == 10
    with pytest.raises(ConfigError, match="cluster.k=11 is larger than the pool"):
        C.resolve_k(10, 11)
    with pytest.raises(ConfigError, match="at least 2"):
        C.resolve_k(1, 0)


def test_kmeans_recovers_blobs_and_is_seeded():
    x, truth = blobs()
    c1 = C.train_kmeans(x, 4, niter=20, seed=3)
    c2 = C.train_kmeans(x, 4, niter=20, seed=3)
    np.testing.assert_array_equal(c1, c2)
    np.testing.assert_allclose(np.linalg.norm(c1, axis=1), 1.0, rtol=1e-5)  # spherical
    labels, sims = C.assign(x, c1)
    # Every true blob maps to exactly one cluster (a relabelling of the truth).
    pairs = set(zip(truth.tolist(), labels.tolist(), strict=False))
    assert len(pairs) == 4 and len({p[1] for p in pairs}) == 4
    assert sims.min() > 0.9


def test_kmeans_trains_with_the_configured_threads_and_restores_the_process_setting(monkeypatch):
    """cluster.threads fixes what the centroids' rounding depends on, whatever the launcher set."""
    faiss = C.import_faiss()
    seen, train = [], faiss.Kmeans.train
    monkeypatch.setattr(faiss.Kmeans, "train", lambda km, x: (seen.append(faiss.omp_get_max_threads()), train(km, x)))
    before = faiss.omp_get_max_threads()
    try:
        faiss.omp_set_num_threads(2)
        x, _ = blobs()
        C.train_kmeans(x, 4, niter=2, seed=0, threads=1)
        C.train_kmeans(x, 4, niter=2, seed=0)  # 0: the process's setting
        assert seen == [1, 2] and faiss.omp_get_max_threads() == 2
    finally:
        faiss.omp_set_num_threads(before)
    with pytest.raises(ConfigError, match="cluster.threads"):
        C.ClusterConfig(threads=-1)


def test_assign_matches_brute_force_argmax():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(300, 8)).astype(np.float32)
    c = rng.normal(size=(7, 8)).astype(np.float32)
    labels, sims = C.assign(x.astype(np.float16), c)
    ref = x.astype(np.float16).astype(np.float32) @ c.T
    np.testing.assert_array_equal(labels, ref.argmax(1))
    np.testing.assert_allclose(sims, ref.max(1), rtol=1e-6)


def test_chunks_reassemble_in_row_order_for_any_world_size():
    n, chunk = 103, 10
    values = np.arange(n) * 3
    for world in (1, 2, 3, 5):
        bounds = C.chunk_bounds(n, chunk)
        parts = [
            np.concatenate(
                [values[s:e] for s, e in (bounds[c] for c in C.owned_chunks(len(bounds), r, world))] or [values[:0]]
            )
            for r in range(world)
        ]
        np.testing.assert_array_equal(C.reorder_chunks(parts, n, chunk), values)


def test_partition_clusters_covers_all_and_balances_work():
    sizes = np.array([100, 1, 1, 50, 50, 70, 3, 0])
    parts = C.partition_clusters(sizes, 3)
    assert sorted(np.concatenate(parts).tolist()) == list(range(len(sizes)))
    load = [float((sizes[p].astype(float) ** 2).sum()) for p in parts]
    assert max(load) == 100**2  # the biggest cluster alone; others share the rest
    assert C.partition_clusters(sizes, 3)[1].tolist() == parts[1].tolist()  # deterministic


def test_members_by_cluster_ignores_minus_one():
    labels = np.array([2, 0, -1, 2, 1, 0])
    members = C.members_by_cluster(labels, 3)
    assert [m.tolist() for m in members] == [[1, 5], [4], [0, 3]]


def test_kmeans_sample_is_seeded_and_capped():
    s = C.kmeans_sample(10_000, 4, 100, seed=0)
    assert len(s) == 400 and np.all(np.diff(s) > 0)
    np.testing.assert_array_equal(s, C.kmeans_sample(10_000, 4, 100, seed=0))
    assert len(C.kmeans_sample(300, 4, 100, seed=0)) == 300
