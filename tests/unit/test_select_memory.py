"""Per-row memory of MedDEL on a partitioned pool: every rank holds a few bytes per pool row, no strings."""

import tracemalloc

import numpy as np

from dataeff.config import load_config
from dataeff.select import distributed_cluster as D
from dataeff.select import meddel as M
from dataeff.select.config import SelectConfig
from dataeff.select.meddel_run import run_meddel

#: Bound on the traced peak per added pool row. In a world of one every pool row is also a
#: local row, so the exchange plan and the local statistics count too: measured ~50 bytes;
#: with a reason string per row (and 8-byte labels, positions) it was ~130.
BYTES_PER_ROW = 90


def _traced_peak(n: int) -> int:
    """Peak bytes numpy and Python allocate during MedDEL on n rows (rows themselves made before)."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(20, 8))[rng.integers(0, 20, n)] + 0.5 * rng.normal(size=(n, 8))
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float16)
    pos = rng.permutation(n)
    emb = D.LocalRows(x[pos], pos, n)  # partitioned, in a world of one
    keys = np.char.add("k", np.char.zfill(np.arange(n).astype(str), 7))
    over = ["embeddings=x", "out=x", "ratio=0.1", "cluster.k=20", "cluster.niter=2", "cluster.device=cpu"]
    cfg = load_config(SelectConfig, None, over)
    tracemalloc.start()
    try:
        d = run_meddel(emb, keys, None, cfg, 0, 1)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert int(d.kept.sum()) == n // 10
    return peak


def test_partitioned_meddel_holds_a_few_bytes_per_pool_row(monkeypatch):
    # Fixed-size work buffers (similarity blocks, exchange rounds) kept small, so that the
    # growth from 50k to 200k rows is what each pool row costs.
    monkeypatch.setattr(M, "_BLOCK_ELEMS", 1 << 20)
    monkeypatch.setattr(D, "EXCHANGE_ROWS", 1 << 13)
    _traced_peak(20_000)  # first-use allocations (faiss, BLAS) stay out of the measurement
    per_row = (_traced_peak(200_000) - _traced_peak(50_000)) / 150_000
    assert per_row < BYTES_PER_ROW, f"{per_row:.0f} bytes per pool row"
