"""Partitioned selection (each rank keeps its own rows) equals the gathered matrix, bit for bit."""

import hashlib

import numpy as np

from tests.multiproc import run_ranks

N, DIM, K = 40_000, 8, 12  # two assignment chunks


def _pool() -> np.ndarray:
    """Unit float16 rows around K centres with planted exact copies."""
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(K, DIM))
    x = centres[rng.integers(0, K, N)] + 0.3 * rng.normal(size=(N, DIM))
    x[rng.choice(N, 500, replace=False)] = x[rng.choice(N, 500, replace=False)]
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float16)


def _stats(rank: int, world: int) -> list[str]:
    # max_scan_rows=1000: clusters of ~3,300 split into scan leaves (meddel.max_scan_rows).
    return [_hash(rank, world, partitioned, bound) for bound in (0, 1000) for partitioned in (False, True)]


def _hash(rank: int, world: int, partitioned: bool, max_scan_rows: int) -> str:
    from dataeff.config import load_config
    from dataeff.select import distributed_cluster as D
    from dataeff.select.config import SelectConfig

    D.EXCHANGE_ROWS = 3000  # many rounds: clusters hold ~3,300 rows, chunks 32,768
    emb = _pool()
    cfg = load_config(SelectConfig, None, ["embeddings=x", "out=x", f"cluster.k={K}", "cluster.niter=5"])
    if partitioned:  # uneven, interleaved shares, as rank files give them
        pos = np.flatnonzero((np.arange(N) * 7919) % 5 % world == rank)[::-1]  # local order does not matter
        emb = D.LocalRows(emb[pos], pos.copy(), N)
    labels, sims, k = D.cluster_pool(emb, cfg.cluster, 0, rank, world, {})
    valid = np.arange(N) % 11 != 0  # some rows invalid: they never move
    m, prev, pos_ = D.redundancy_stats(emb, labels, sims, valid, k, "hard", 0, rank, world, max_scan_rows=max_scan_rows)
    assert (prev >= 0).sum() >= 400, "planted copies are found"
    return hashlib.sha256(b"".join(a.tobytes() for a in (labels, sims, m, prev, pos_))).hexdigest()


def test_partitioned_rows_match_gathered_matrix():
    (one,) = run_ranks(_stats, 1)
    assert one[0] == one[1] and one[2] == one[3] and one[0] != one[2]
    assert run_ranks(_stats, 2) == [one, one]
