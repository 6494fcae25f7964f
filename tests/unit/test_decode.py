"""TIFF variants PIL cannot read and EXIF orientation: shard inspection and the downstream reader agree."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dataeff.data import decode, downstream
from dataeff.data.quality import InspectOptions, inspect_bytes, pil_limits
from tests.media_files import exif_rotated_jpeg, tiff_bytes

RGB = np.random.default_rng(3).integers(30, 220, (40, 56, 3)).astype(np.uint8)
_Y, _X = np.mgrid[0:40, 0:56]
#: Smooth (JPEG keeps it close) and asymmetric (any wrong turn or mirror shows).
PHOTO = np.stack([_X * 4, _Y * 5, (_X + _Y) * 2], axis=-1).astype(np.uint8)


def _inspect(data: bytes, name: str, **opts):
    with pil_limits(0):
        return inspect_bytes(data, name, InspectOptions(min_side=8, **opts))


def _stored(item) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(item.payload)).convert("RGB"))


def test_pil_cannot_read_rgb_labelled_minisblack() -> None:
    with pytest.raises(Image.UnidentifiedImageError):
        Image.open(io.BytesIO(tiff_bytes("minisblack3", RGB)))


@pytest.mark.parametrize("kind", ["minisblack3", "rgb16", "planar", "multipage"])
def test_tiff_variants_shard_lossless(kind: str) -> None:
    item = _inspect(tiff_bytes(kind, RGB), "a.tif")
    assert item.row["status"] == "ok", item.row["reason"]
    assert item.ext == "png" and (item.row["width"], item.row["height"]) == (56, 40)
    assert np.array_equal(_stored(item), RGB)  # multi-page: the first page


def test_16bit_gray_tiff_is_scaled_not_clipped() -> None:
    item = _inspect(tiff_bytes("gray16", RGB), "a.tif")
    assert item.row["status"] == "ok"
    assert np.array_equal(_stored(item)[:, :, 0], RGB[:, :, 0])  # v * 257 / 257


def test_damaged_tiff_is_truncated() -> None:
    data = tiff_bytes("minisblack3", RGB)
    assert _inspect(data[: len(data) // 3], "a.tif").row["reason"] == "truncated"


@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_exif_orientation_applied_and_recorded(orientation: int) -> None:
    data = exif_rotated_jpeg(PHOTO, orientation)
    upright = np.asarray(decode.orient(Image.fromarray(PHOTO), orientation))
    item = _inspect(data, "p.jpg")
    assert item.row["orientation"] == orientation
    assert (item.row["width"], item.row["height"]) == (upright.shape[1], upright.shape[0])
    assert item.payload != data  # re-encoded upright, not stored sideways
    assert np.abs(_stored(item).astype(int) - upright).mean() < 3  # JPEG twice
    off = _inspect(data, "p.jpg", exif_transpose=False)
    assert off.row["orientation"] == 1 and off.payload == data


def _pair(root: Path, stem: str, image: bytes, mask: np.ndarray, ext: str = ".tif") -> None:
    for sub in ("images", "masks"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    (root / "images" / f"{stem}{ext}").write_bytes(image)
    Image.fromarray(mask).save(root / "masks" / f"{stem}.png")


def test_downstream_reads_tiffs_and_exif_like_shard(tmp_path: Path) -> None:
    mask = np.zeros((40, 56), np.uint8)
    mask[5:20, 10:30] = 255
    _pair(tmp_path, "a", tiff_bytes("minisblack3", RGB), mask)
    _pair(tmp_path, "b", tiff_bytes("gray16", RGB), mask)
    _pair(tmp_path, "c", exif_rotated_jpeg(RGB, 6), np.asarray(decode.orient(Image.fromarray(mask), 6)), ".jpg")
    pairs = downstream.find_pairs(tmp_path, "generic")
    assert downstream.pair_problems(tmp_path, pairs) == []
    data = downstream.SegmentationDataset(pairs, downstream.JointTransform(32, train=False), 2, native=True)
    for i in range(3):
        item = data[i]
        assert item["image"].shape == (3, 32, 32) and item["mask"].sum() > 0
    assert np.array_equal(np.asarray(decode.read_rgb(pairs[0][1])), RGB)
    assert data[2]["native_mask"].shape == (56, 40)  # upright: the portrait size


def test_pair_problems_lists_every_bad_file(tmp_path: Path) -> None:
    mask = np.zeros((40, 56), np.uint8)
    good = tiff_bytes("minisblack3", RGB)
    _pair(tmp_path, "a", good, mask)
    _pair(tmp_path, "b", good[: len(good) // 2], mask)
    _pair(tmp_path, "c", b"II*\x00" + b"\x00" * 40, mask)
    _pair(tmp_path, "d", good, np.zeros((10, 10), np.uint8))
    problems = downstream.pair_problems(tmp_path, downstream.find_pairs(tmp_path, "generic"))
    assert len(problems) == 3
    assert problems[0].startswith("images/b.tif cannot be decoded")
    assert problems[1].startswith("images/c.tif cannot be decoded")
    assert "pair 'd' has image size (56, 40) but mask size (10, 10)" in problems[2]


def test_tiff_mask_values_are_kept(tmp_path: Path) -> None:
    import tifffile

    ids = np.zeros((12, 16), np.uint16)
    ids[2:5, 3:9] = 2
    tifffile.imwrite(tmp_path / "m.tif", ids)
    assert np.array_equal(downstream.read_mask(tmp_path / "m.tif", 3), ids.astype(np.int64))
