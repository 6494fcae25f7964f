"""``dataeff shard``: keys, packing, quality stats, bad inputs, determinism, idempotence."""

from __future__ import annotations

import io
import tarfile

import numpy as np
import pytest

from dataeff.data.keys import make_key, site_of
from dataeff.data.quality import quality_stats, wide_to_uint8
from dataeff.data.shard import _header, _tarfile_header, starts_new_shard, tar_member

# --------------------------------------------------------------------------- pure helpers


def test_keys_are_safe_unique_and_stable():
    a, b = make_key("site 1/v.1/a b.jpg"), make_key("site_1/v_1/a_b.jpg")
    assert a != b, "paths that sanitise alike must still get distinct keys"
    for key in (a, b):
        assert "/" not in key and "." not in key
        assert all(c.isalnum() or c in "_-" for c in key)
    assert a == make_key("site 1/v.1/a b.jpg")
    assert a.startswith("site_1_v_1_a_b_jpg-") and len(a.split("-")[-1]) == 8
    assert site_of("centre2/video3/f.jpg") == "centre2"
    assert site_of("centre2/video3/f.jpg", level=1) == "video3"
    assert site_of("f.jpg") == ""


def test_new_shard_by_count_and_bytes():
    assert not starts_new_shard(0, 0, 10**9, max_count=2, max_bytes=10)  # a big sample still opens the first shard
    assert starts_new_shard(2, 20, 10, max_count=2, max_bytes=10**6)
    assert not starts_new_shard(1, 10, 10, max_count=2, max_bytes=10**6)
    assert starts_new_shard(1, 40, 40, max_count=100, max_bytes=70)  # 40 + 40 bytes > 70


@pytest.mark.parametrize(
    ("name", "size"),
    [("a.jpg", 0), ("k" * 95 + ".json", 123), ("k" * 96 + ".json", 511), ("é" * 49 + ".jpg", 70_001),
     ("x" * 300 + ".png", 7)],
)  # fmt: skip
def test_tar_member_matches_tarfile(name, size):
    """The template header equals tarfile's, including names at and past the 100-byte field."""
    data = bytes(range(256)) * (size // 256) + bytes(size % 256)
    member = tar_member(name, data)
    header = _tarfile_header(name, len(data))
    assert member[: len(header)] == header
    assert len(member) % 512 == 0 and member[len(header) : len(header) + len(data)] == data
    with tarfile.open(fileobj=io.BytesIO(member + bytes(1024))) as tar:
        (info,) = tar.getmembers()
        assert (info.name, info.size, tar.extractfile(info).read()) == (name, len(data), data)
    assert _header(name, 8**11) == _tarfile_header(name, 8**11)  # past the octal size field


def test_quality_stats_detect_dark_bright_and_blur():
    black = quality_stats(np.zeros((32, 32)))
    assert black["dark_frac"] == 1.0 and black["mean"] == 0.0 and black["laplacian_var"] == 0.0
    white = quality_stats(np.full((32, 32), 255.0))
    assert white["bright_frac"] == 1.0 and white["dark_frac"] == 0.0
    checker = quality_stats((np.indices((32, 32)).sum(0) % 2) * 255.0)
    ramp = quality_stats(np.tile(np.linspace(0, 255, 32), (32, 1)))
    assert checker["laplacian_var"] > 1000 * max(ramp["laplacian_var"], 1e-6)


def test_wide_to_uint8_scales_16_bit():
    v = np.array([[0, 257, 32896, 65535]], dtype=np.uint16)
    assert wide_to_uint8(v).tolist() == [[0, 1, 128, 255]]
    # out-of-range 32-bit values are stretched from their own range
    assert wide_to_uint8(np.array([[-100, 0, 155]], dtype=np.int32)).tolist() == [[0, 100, 255]]


def test_signatures_of_a_large_kept_jpeg_come_from_its_dct_scaled_decode():
    from PIL import Image

    from dataeff.data import signatures as sig
    from dataeff.data.quality import InspectOptions, inspect_bytes, pil_limits
    from tests.fixtures import kvasir_images

    data = kvasir_images(1)[0].read_bytes()  # 320 px wide: DCT scaling halves it
    with pil_limits(0):
        row = inspect_bytes(data, "a/frame.jpg", InspectOptions()).row
    full = Image.open(io.BytesIO(data)).convert("RGB")
    assert row["status"] == "ok" and min(full.size) >= 256
    # Its full-size pixels were never decoded: no pixel hash (the byte sha256 stands in) ...
    assert row["pixel_sha256"] is None and row["sha256"]
    # ... but pHash and thumbnail agree with a full decode's (what the leakage guard computes).
    bits = np.int64(row["phash"]).view(np.uint64)
    assert int(sig.popcount64(bits ^ sig.pack_phash(sig.phash_bits(full))[0])) <= 4
    thumb = np.frombuffer(row["thumb"], np.uint8).reshape(1, 16, 16)
    assert sig.thumb_corr(thumb, sig.thumbnail(full)[None])[0] >= 0.999


def test_index_written_in_batches_equals_the_index_written_whole(tmp_path, monkeypatch):
    """The shard stage writes its index a journal at a time; the table read back is the same."""
    import pandas as pd
    import pyarrow.parquet as pq

    from dataeff.data import shard

    monkeypatch.setattr(shard, "_INDEX_GROUP_ROWS", 3)
    rows = [{"key": f"k{i}", "status": "ok", "reason": "", "frame": -1, "phash": None} for i in range(7)]
    batches = [rows[0:2], rows[2:4], [], rows[4:7]]  # an empty tail, as when no file follows the last shard
    shard.write_index(tmp_path / "whole.parquet", rows)
    shard.write_index_batches(tmp_path / "batches.parquet", batches)
    pd.testing.assert_frame_equal(
        pd.read_parquet(tmp_path / "batches.parquet"), pd.read_parquet(tmp_path / "whole.parquet")
    )
    meta = pq.ParquetFile(tmp_path / "batches.parquet").metadata
    assert [meta.row_group(i).num_rows for i in range(meta.num_row_groups)] == [3, 1, 3]  # at most 3 rows a group
