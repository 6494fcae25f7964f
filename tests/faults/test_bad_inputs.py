"""The bad-input corpus, generated on the fly: every path under ``src`` gets an index row, memory stays bounded.

One tree holds what a real raw-data share can hold besides images: a link to itself, a
folder link to its own parent, a link to nothing, a FIFO, a link to ``/dev/zero``, a 2 GB
(sparse) file named ``.jpg``, a 157 KB 16-bit 9000 x 9000 PNG, a PNG with a bad IDAT CRC
or without its end, JPEGs cut short and padded with an end marker or with noise in their
entropy data. ``dataeff shard`` runs in a subprocess that reports its peak memory.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from dataeff.constants import (
    BAD_CHECKSUM,
    BROKEN_LINK,
    CORRUPT_DATA,
    NOT_A_REGULAR_FILE,
    SYMLINK_LOOP,
    TOO_LARGE,
)
from dataeff.data.integrity import decode_error, decoded_bytes, read_input, scan_tree
from dataeff.data.keys import make_key
from tests.fixtures import REPO, kvasir_images, png_bytes, small_jpeg

#: Peak memory (max RSS) the stage may add to the process after its imports: the 16-bit
#: 9000 x 9000 PNG decoded (162 MB) and converted to RGB (324 MB in PIL) fit; reading the 2 GB
#: file, or scaling the 16-bit pixels in one float64 array (648 MB per temporary), would not.
MAX_EXTRA_RSS_MB = 700


def _entropy_start(jpeg: bytes) -> int:
    sos = jpeg.find(b"\xff\xda")
    return sos + 2 + int.from_bytes(jpeg[sos + 2 : sos + 4], "big")


def _bad_crc(png: bytes) -> bytes:
    """``png`` with the last byte of its first IDAT chunk's CRC flipped."""
    out = bytearray(png)
    at = out.find(b"IDAT")
    out[at + 4 + int.from_bytes(out[at - 4 : at], "big") + 3] ^= 0xFF
    return bytes(out)


def _wide_png(side: int) -> bytes:
    """A 16-bit grayscale PNG of ``side`` x ``side`` px that compresses to a few hundred KB."""
    values = np.zeros((side, side), dtype=np.uint16)
    values[::97, :] = 40000
    values[:, ::89] = 1000
    return png_bytes(Image.fromarray(values))


def _corpus(root: Path) -> dict[str, str]:
    """Write the corpus under ``root``; returns source path -> expected index reason ('' = ok)."""
    good = small_jpeg(kvasir_images(1)[0], 96)
    png = png_bytes(Image.open(io.BytesIO(good)).convert("RGB"))
    start = _entropy_start(good)
    noise = np.random.default_rng(0).integers(0, 255, 200, dtype=np.uint8).tobytes().replace(b"\xff", b"\0")
    files = {
        "c/good.jpg": (good, ""),
        "c/good.png": (png, ""),
        "w/wide16.png": (_wide_png(9000), ""),  # apart from c/: decoded once, not again through c_again
        "d/bad_crc.png": (_bad_crc(png), BAD_CHECKSUM),
        "d/no_end.png": (png[: png.rfind(b"IEND") - 4], "truncated"),
        "d/cut_then_eoi.jpg": (good[: start + 200] + b"\xff\xd9", "truncated"),
        "d/noisy_entropy.jpg": (good[: start + 30] + noise + good[start + 230 :], CORRUPT_DATA),
    }
    for rel, (data, _) in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    expected = {rel: reason for rel, (_, reason) in files.items()}
    odd = root / "odd"
    odd.mkdir()
    (odd / "self.jpg").symlink_to("self.jpg")
    (odd / "parent").symlink_to("..")  # a folder link into its own ancestor
    (odd / "dangling.jpg").symlink_to("nowhere.jpg")
    os.mkfifo(odd / "fifo.jpg")  # opening it to read would block the job forever
    (odd / "zeros.jpg").symlink_to("/dev/zero")  # reading it would never end
    (odd / "c_again").symlink_to("../c")  # a folder link elsewhere is followed
    with open(odd / "huge.jpg", "wb") as fh:  # 2 GB, sparse: costs no disk
        fh.truncate(2 << 30)
    expected |= {
        "odd/self.jpg": SYMLINK_LOOP,
        "odd/parent": SYMLINK_LOOP,
        "odd/dangling.jpg": BROKEN_LINK,
        "odd/fifo.jpg": NOT_A_REGULAR_FILE,
        "odd/zeros.jpg": NOT_A_REGULAR_FILE,
        "odd/huge.jpg": TOO_LARGE,
    }
    for rel in ("good.jpg", "good.png"):
        expected[f"odd/c_again/{rel}"] = "exact_duplicate_of:" + make_key(f"c/{rel}")
    return expected


@pytest.mark.timeout(120)
def test_every_path_gets_a_row_and_memory_stays_bounded(tmp_path: Path) -> None:
    raw, out = tmp_path / "raw", tmp_path / "out"
    expected = _corpus(raw)
    code = (
        "import resource, sys; from dataeff.cli import main; import dataeff.data.shard; "
        "peak = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss; before = peak(); "
        "rc = main(sys.argv[1:]); print('extra_kb', peak() - before); sys.exit(rc)"
    )
    args = ["shard", f"src={raw}", f"out={out}", "workers=1", "progress=false", "min_side=16"]
    proc = subprocess.run([sys.executable, "-c", code, *args], cwd=REPO, capture_output=True, text=True, timeout=110)
    assert proc.returncode == 0, proc.stderr
    extra_mb = int(proc.stdout.split("extra_kb")[1]) / 1024
    print(f"shard of the bad-input corpus: peak RSS +{extra_mb:.0f} MB over the imports")
    assert extra_mb < MAX_EXTRA_RSS_MB, f"peak RSS +{extra_mb:.0f} MB: a file was read or decoded unbounded"

    index = pd.read_parquet(out / "index.parquet")
    assert index["source"].tolist() == sorted(expected), "one row per path under src, sorted"
    assert dict(zip(index["source"], index["reason"], strict=True)) == expected
    huge = index.set_index("source").loc["odd/huge.jpg"]
    assert (huge["size"], huge["sha256"]) == (2 << 30, ""), "too_large keeps the size, reads nothing"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["num_files"] == len(expected) and summary["num_samples"] == 3


def test_scan_follows_links_to_folders_but_never_loops(tmp_path: Path) -> None:
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "a" / "b" / "x.jpg").write_bytes(b"x")
    (tmp_path / "a" / "b" / "to_a").symlink_to("../../a")  # a -> b -> to_a = a: a loop two levels up
    (tmp_path / "a" / "b" / "to_root").symlink_to(tmp_path)
    (tmp_path / "side").symlink_to("a/b")
    got = {e.rel: e.reason for e in scan_tree(tmp_path)}
    # Through 'side' (= a/b), a is not on the path yet, so side/to_a is followed once; its b is.
    assert got == {
        "a/b/x.jpg": "",
        "a/b/to_a": SYMLINK_LOOP,
        "a/b/to_root": SYMLINK_LOOP,
        "side/x.jpg": "",
        "side/to_a/b": SYMLINK_LOOP,
        "side/to_root": SYMLINK_LOOP,
    }


def test_read_input_refuses_before_reading(tmp_path: Path) -> None:
    big = tmp_path / "big.jpg"
    big.write_bytes(b"\xff" * 1000)
    assert read_input(big, 999).reason == TOO_LARGE  # type: ignore[union-attr]
    assert read_input(big, 1000) == b"\xff" * 1000
    os.mkfifo(tmp_path / "fifo.jpg")
    assert read_input(tmp_path / "fifo.jpg", 0).reason == NOT_A_REGULAR_FILE  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("mode", "dtype", "bytes_per_pixel"),
    [("L", np.uint8, 1), ("I;16", np.uint16, 2), ("RGB", np.uint8, 3), ("RGBA", np.uint8, 4)],
)
def test_decoded_bytes_count_depth_and_channels(mode: str, dtype: type, bytes_per_pixel: int) -> None:
    shape = (40, 30) if mode in ("L", "I;16") else (40, 30, len(mode))
    data = png_bytes(Image.fromarray(np.zeros(shape, dtype=dtype)))
    img = Image.open(io.BytesIO(data))
    assert img.mode == mode
    assert decoded_bytes(img, data) == 40 * 30 * bytes_per_pixel
    assert decode_error(img, data, 40 * 30 * bytes_per_pixel) == ""
    assert decode_error(img, data, 40 * 30 * bytes_per_pixel - 1) == "decompression_bomb"
