"""Pure parts of remote reading: locations, request grouping, which failures are retried."""

from __future__ import annotations

import numpy as np

from dataeff.data import remote
from dataeff.data.stream import coalesce


def test_locations_keep_url_slashes_and_local_paths():
    assert remote.is_url("s3://b/x") and remote.is_url("GS://b") and remote.is_url("https://h/p")
    assert not remote.is_url("shards/pool") and not remote.is_url("pipe:cat x.tar")
    assert remote.join("s3://b/pool/", "index.parquet") == "s3://b/pool/index.parquet"
    assert remote.parent("s3://b/pool/x-000000.tar") == "s3://b/pool"
    assert remote.basename("http://h:8000/pool/") == "pool"
    assert remote.join("shards/pool", "index.parquet") == "shards/pool/index.parquet"


def test_coalesce_reads_nearby_samples_in_one_request_and_caps_its_size():
    starts = np.array([0, 100, 200, 10_000, 10_100])
    ends = starts + 50
    assert coalesce(starts, ends, max_gap=60, max_bytes=1_000) == [(0, 3), (3, 5)]
    assert coalesce(starts, ends, max_gap=20_000, max_bytes=1_000) == [(0, 3), (3, 5)]  # size cap
    assert coalesce(starts, ends, max_gap=20_000, max_bytes=100_000) == [(0, 5)]
    assert coalesce(starts[:0], ends[:0], 1, 1) == []


class _Status(Exception):
    def __init__(self, status: int) -> None:
        super().__init__(status)
        self.status = status


def test_transient_failures_are_told_from_permanent_ones():
    assert remote.is_transient(ConnectionResetError()) and remote.is_transient(TimeoutError())
    assert remote.is_transient(_Status(503)) and remote.is_transient(_Status(429))
    assert not remote.is_transient(_Status(403)) and not remote.is_transient(_Status(404))
    assert not remote.is_transient(FileNotFoundError("s3://b/x")) and not remote.is_transient(PermissionError())
