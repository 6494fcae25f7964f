"""``dataeff shard`` holds no index row once its shard is journalled: memory does not grow with the pool."""

from __future__ import annotations

import tracemalloc
from pathlib import Path

import pandas as pd

from dataeff.constants import INDEX_NAME
from tests.fixtures import make_raw_tree, shard_tree

#: Bound on the traced peak per added input file. Measured ~760 bytes: the file listing, and
#: one sha256 and key per stored image for exact duplicates. Holding every index row until
#: the end (and a second copy of the listing) cost ~2,700.
BYTES_PER_FILE = 1200


def _traced_peak(raw: Path, out: Path) -> int:
    tracemalloc.start()
    try:
        summary = shard_tree(raw, out, samples_per_shard=4)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert summary["num_rows"] == len(pd.read_parquet(out / INDEX_NAME)) == summary["counts_by_status"]["ok"]
    return peak


def test_shard_memory_does_not_hold_the_index_rows(tmp_path):
    small, large = (make_raw_tree(tmp_path / f"raw{n}", n=n, size=24) for n in (60, 360))
    _traced_peak(small, tmp_path / "warm")  # first-use allocations stay out of the measurement
    per_file = (_traced_peak(large, tmp_path / "large") - _traced_peak(small, tmp_path / "small")) / 300
    assert per_file < BYTES_PER_FILE, f"{per_file:.0f} bytes per input file"
