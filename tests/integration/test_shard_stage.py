"""``dataeff shard``: keys, packing, quality stats, bad inputs, determinism, idempotence."""

from __future__ import annotations

import io
import json
import logging
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image, ImageFile

from dataeff.config import ConfigError
from dataeff.data.keys import make_key
from tests.fixtures import (
    REPO,
    jpeg_bytes,
    kvasir_images,
    make_raw_tree,
    make_shards,
    png_bytes,
    shard_tree,
    small_jpeg,
    tar_samples,
)

# --------------------------------------------------------------------------- bad inputs


def _bad_tree(root: Path) -> dict[str, str]:
    """A tree with good, convertible and broken files; returns source -> expected reason ('' = ok)."""
    good = [small_jpeg(p, 48) for p in kvasir_images(3)]
    photo = Image.open(io.BytesIO(good[0])).convert("RGB")
    ramp16 = (np.tile(np.linspace(0, 65535, 40), (40, 1))).astype(np.uint16)
    png_good = png_bytes(photo)
    full_jpeg = kvasir_images(1)[0].read_bytes()
    files: dict[str, tuple[bytes, str]] = {
        "a/good0.jpg": (good[0], ""),
        "a/good1.JPG": (good[1], ""),
        "a/good2.jpeg": (good[2], ""),
        "a/zz_dup_of_good0.jpg": (good[0], "exact_duplicate_of:" + make_key("a/good0.jpg")),
        "a/good.png": (png_good, ""),
        "b/zero.jpg": (b"", "zero_byte"),
        "b/cut.jpg": (good[1][: len(good[1]) // 2], "truncated"),
        "b/cut.png": (png_good[: len(png_good) // 2], "truncated"),
        # full-size JPEG cut short: decoded with DCT scaling, which must still see the cut
        "b/cut_big.jpg": (full_jpeg[: len(full_jpeg) * 3 // 4], "truncated"),
        "b/text.jpg": (b"<html>404 not found</html>\n" * 4, "not_an_image"),
        "b/tiny.png": (png_bytes(photo.resize((10, 10))), "too_small"),
        "b/bomb.png": (png_bytes(Image.new("RGB", (800, 800), (9, 9, 9))), "decompression_bomb"),
        "b/float.tif": (b"", "unreadable_mode"),  # filled below (needs TIFF encoding)
        "b/notes.txt": (b"frame list\n", "unsupported_extension"),
        "c/cmyk.jpg": (jpeg_bytes(photo.convert("CMYK")), ""),
        "c/palette.png": (png_bytes(photo.convert("P")), ""),
        "c/gray16.png": (png_bytes(Image.fromarray(ramp16)), ""),
        "c/gray.jpg": (jpeg_bytes(photo.convert("L")), ""),
        "c/gray_alpha.png": (png_bytes(photo.convert("LA")), ""),
        "c/rgba.png": (png_bytes(photo.convert("RGBA")), ""),
        "c/frame.bmp": (b"", ""),
        "c/frame.TIFF": (b"", ""),
    }
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).random((40, 40), dtype=np.float32)).save(buf, format="TIFF")
    files["b/float.tif"] = (buf.getvalue(), "unreadable_mode")
    for name, fmt in (("c/frame.bmp", "BMP"), ("c/frame.TIFF", "TIFF")):
        buf = io.BytesIO()
        photo.save(buf, format=fmt)
        files[name] = (buf.getvalue(), "")
    for rel, (data, _) in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return {rel: reason for rel, (_, reason) in files.items()}


def test_every_bad_input_gets_its_reason_and_the_job_finishes(tmp_path, monkeypatch):
    expected = _bad_tree(tmp_path / "raw")
    # Another library switching truncated loading on must not let truncated files pass.
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    summary = shard_tree(tmp_path / "raw", tmp_path / "out", max_pixels=100_000)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True, "the PIL setting must be restored afterwards"

    index = pd.read_parquet(tmp_path / "out" / "index.parquet")
    assert index["source"].tolist() == sorted(expected), "one row per input file, sorted by source"
    got = dict(zip(index["source"], index["reason"], strict=False))
    assert got == expected
    status = dict(zip(index["source"], index["status"], strict=False))
    assert status["a/zz_dup_of_good0.jpg"] == "duplicate"
    assert status["c/cmyk.jpg"] == "ok" and status["b/cut.jpg"] == "rejected"

    samples = tar_samples(tmp_path / "out")
    ok = index[index["status"] == "ok"]
    assert sorted(samples) == sorted(ok["key"]), "exactly the ok samples are stored, duplicates once"
    for key, parts in samples.items():
        img_ext = "jpg" if "jpg" in parts else "png"
        img = Image.open(io.BytesIO(parts[img_ext]))
        img.load()
        assert img.mode == "RGB", key
        meta = json.loads(parts["json"])
        assert meta["key"] == key and (meta["width"], meta["height"]) == img.size
        assert set(meta["quality"]) == {"mean", "std", "laplacian_var", "dark_frac", "bright_frac"}
    by_source = {s: samples[k] for s, k in zip(ok["source"], ok["key"], strict=False)}
    assert by_source["a/good0.jpg"]["jpg"] == (tmp_path / "raw/a/good0.jpg").read_bytes(), "RGB JPEG kept as is"
    assert "png" in by_source["c/frame.bmp"] and "jpg" in by_source["c/cmyk.jpg"]
    assert json.loads(by_source["c/cmyk.jpg"]["json"])["mode"] == "CMYK"
    # 16-bit ramp 0..65535 must come out as 0..255, not clipped at 255 or truncated to its low byte
    gray16 = np.asarray(Image.open(io.BytesIO(by_source["c/gray16.png"]["png"])))
    assert gray16.shape == (40, 40, 3) and gray16[0, 0, 0] == 0 and gray16[0, -1, 0] == 255
    assert np.all(np.diff(gray16[0, :, 0].astype(int)) >= 0)

    assert summary["counts_by_status"] == {"duplicate": 1, "ok": 12, "rejected": 9}
    assert summary["counts_by_reason"]["exact_duplicate_of"] == 1
    assert summary["num_samples"] == 12 == sum(s["samples"] for s in summary["shards"])


def test_unreadable_file_is_reported_not_fatal(tmp_path):
    from dataeff.data.quality import InspectOptions
    from dataeff.data.shard import inspect_file

    item = inspect_file(tmp_path / "vanished.jpg", "vanished.jpg", InspectOptions())
    assert (item.row["status"], item.row["reason"], item.payload) == ("rejected", "read_error", None)


def test_output_inside_the_source_tree_is_not_read_as_input(tmp_path):
    raw = make_raw_tree(tmp_path / "raw", n=6, size=40)
    first = shard_tree(raw, raw / "shards" / "x")
    again = shard_tree(raw, raw / "shards" / "x")
    assert first["num_files"] == again["num_files"] == 6 and again == first


def test_webdataset_reads_the_shards(tmp_path):
    import webdataset as wds

    out = make_shards(tmp_path, n=10, samples_per_shard=4)
    tars = sorted(str(p) for p in out.glob("*.tar"))
    samples = list(wds.WebDataset(tars, shardshuffle=False, empty_check=False).decode("pil"))
    index = pd.read_parquet(out / "index.parquet")
    assert [s["__key__"] for s in samples] == index["key"].tolist()
    assert all(s["json"]["key"] == s["__key__"] and s["jpg"].mode == "RGB" for s in samples)


def test_index_offsets_locate_every_stored_image(tmp_path):
    """``offset``/``length`` point at each sample's image bytes, deep (GNU long) names included."""
    raw = make_raw_tree(tmp_path / "raw", n=6, size=40)
    deep = raw / ("d" * 60) / ("e" * 60)
    deep.mkdir(parents=True)
    Image.open(sorted(raw.rglob("*.jpg"))[0]).save(deep / "frame.png")
    (raw / "site0" / "zz_copy.jpg").write_bytes(sorted(raw.rglob("*.jpg"))[1].read_bytes())
    shard_tree(raw, tmp_path / "out", samples_per_shard=3)
    index = pd.read_parquet(tmp_path / "out" / "index.parquet")
    stored = tar_samples(tmp_path / "out")
    assert len(make_key(str((deep / "frame.png").relative_to(raw))) + ".png") > 100
    for row in index.itertuples():
        if row.status != "ok":
            assert (row.offset, row.length) == (0, 0) and row.reason
            continue
        with open(tmp_path / "out" / row.shard, "rb") as fh:
            fh.seek(row.offset)
            data = fh.read(row.length)
        (image,) = [v for ext, v in stored[row.key].items() if ext != "json"]
        assert data == image
    assert (index["status"] == "duplicate").sum() == 1 and index["source"].str.endswith("frame.png").any()


def test_keep_duplicates_stores_them(tmp_path):
    raw = make_raw_tree(tmp_path / "raw", n=4, size=48)
    first = sorted(raw.rglob("*.jpg"))[0]
    shutil.copy(first, raw / "zz_copy.jpg")
    shard_tree(raw, tmp_path / "out", keep_duplicates=True)
    index = pd.read_parquet(tmp_path / "out" / "index.parquet").set_index("source")
    row = index.loc["zz_copy.jpg"]
    assert row["status"] == "ok" and row["reason"].startswith("exact_duplicate_of:") and row["shard"]
    assert len(tar_samples(tmp_path / "out")) == 5


def test_resize_long_side(tmp_path):
    out = make_shards(tmp_path, n=6, size=64, max_side=32)
    index = pd.read_parquet(out / "index.parquet")
    assert (index[["width", "height"]].max(axis=1) == 32).all()
    for parts in tar_samples(out).values():
        assert max(Image.open(io.BytesIO(parts["jpg"])).size) == 32


# --------------------------------------------------------------------------- determinism and idempotence


def test_same_bytes_whatever_the_worker_count(tmp_path):
    raw = make_raw_tree(tmp_path / "raw", n=40, size=40, sites=3)
    (raw / "site0" / "broken.jpg").write_bytes(b"not a jpeg")
    shutil.copy(sorted(raw.rglob("*.jpg"))[3], raw / "copy.jpg")
    # ~3 KiB per sample in the tar: the byte cap (15 KiB) binds before the count cap (6)
    one = shard_tree(raw, tmp_path / "w1" / "set", workers=1, samples_per_shard=6, max_shard_mb=0.015)
    two = shard_tree(raw, tmp_path / "w2" / "set", workers=2, chunksize=2, samples_per_shard=6, max_shard_mb=0.015)
    assert one["num_shards"] == two["num_shards"] >= 8
    assert one["shards"] == two["shards"] and max(s["samples"] for s in one["shards"]) < 6
    for tar in sorted((tmp_path / "w1" / "set").glob("*.tar")):
        assert tar.read_bytes() == (tmp_path / "w2" / "set" / tar.name).read_bytes(), tar.name
    a = pd.read_parquet(tmp_path / "w1" / "set" / "index.parquet")
    b = pd.read_parquet(tmp_path / "w2" / "set" / "index.parquet")
    pd.testing.assert_frame_equal(a, b)
    assert list(a["site"].unique()) == ["", "site0", "site1", "site2"]
    with tarfile.open(tmp_path / "w2" / "set" / "set-000000.tar") as tar:
        m = tar.getmembers()[0]
        assert (m.mtime, m.uid, m.gid, m.uname, m.mode) == (0, 0, 0, "", 0o444)
    # keys in the tars appear in index order
    keys = [
        k
        for t in sorted((tmp_path / "w1" / "set").glob("*.tar"))
        for k in dict.fromkeys(n.split(".")[0] for n in tarfile.open(t).getnames())
    ]
    assert keys == a[a["status"] == "ok"]["key"].tolist()


def test_finished_output_is_skipped_and_changed_settings_are_refused(tmp_path, caplog):
    out = make_shards(tmp_path, n=6)
    tar = out / "demo-000000.tar"
    stamp = tar.stat().st_mtime_ns
    with caplog.at_level(logging.INFO, logger="dataeff"):
        shard_tree(tmp_path / "raw", out, min_side=8, workers=2)
    assert "already complete" in caplog.text
    assert tar.stat().st_mtime_ns == stamp
    with pytest.raises(ConfigError, match="overwrite=true"):
        shard_tree(tmp_path / "raw", out, min_side=8, max_side=16)
    summary = shard_tree(tmp_path / "raw", out, min_side=8, max_side=16, overwrite=True)
    assert summary["config"]["max_side"] == 16
    assert max(pd.read_parquet(out / "index.parquet")["width"]) == 16


def test_cli_runs_the_stage_and_saves_the_resolved_config(tmp_path):
    from dataeff.cli import main as cli

    raw = make_raw_tree(tmp_path / "raw", n=5, size=40)
    out = tmp_path / "shards" / "x"
    args = ["shard", "--config", str(REPO / "configs/shard/tiny.yaml"), f"src={raw}", f"out={out}", "progress=false"]
    assert cli(args) == 0
    assert (out / "x-000000.tar").is_file() and (out / "config.yaml").is_file()
    assert "workers:" in (out / "config.yaml").read_text()
    assert not (out / ".parts").exists()
    assert cli(["shard", f"src={tmp_path / 'nope'}", f"out={out}"]) == 2
    assert cli(["shard", f"src={raw}", f"out={out}", "samples_per_shard=0"]) == 2


# --------------------------------------------------------------------------- signatures (dataeff-shards/3)


def test_index_holds_the_signatures_of_the_stored_pixels(tmp_path):
    from dataeff.data import signatures as sig

    raw = make_raw_tree(tmp_path / "raw", n=6, size=48)
    first = sorted(raw.rglob("*.jpg"))[0]
    Image.open(first).convert("RGB").save(raw / "site0" / "frame.png")  # lossless
    (raw / "site0" / "cut.jpg").write_bytes(b"\xff\xd8\xff\xe0 cut short")
    shard_tree(raw, tmp_path / "out")
    index = pd.read_parquet(tmp_path / "out" / "index.parquet")
    assert str(index["phash"].dtype) == "int64" and index["thumb"].map(type).eq(bytes).sum() == 7
    stored = tar_samples(tmp_path / "out")
    for row in index[index["status"] == "ok"].itertuples():
        (data,) = [v for ext, v in stored[row.key].items() if ext != "json"]
        image = Image.open(io.BytesIO(data)).convert("RGB")  # decoded in full, as a reader does
        assert row.pixel_sha256 == sig.pixel_sha256(image), row.source
        bits = sig.pack_phash(sig.phash_bits(image))
        assert np.int64(row.phash).view(np.uint64) == bits[0], "same 64 bits, stored as int64"
        assert row.thumb == sig.thumbnail(image).tobytes() and len(row.thumb) == 256
    bad = index.set_index("source").loc["site0/cut.jpg"]
    assert bad["status"] == "rejected" and bad[["pixel_sha256", "thumb"]].isna().all() and bad["phash"] == 0
    # The lossless PNG re-save holds the same pixels as its JPEG: same pixel hash, other byte hash.
    png, jpg = index.set_index("source").loc[["site0/frame.png", first.relative_to(raw).as_posix()]].itertuples()
    assert png.sha256 != jpg.sha256 and png.pixel_sha256 == jpg.pixel_sha256 and png.phash == jpg.phash


def test_output_of_an_older_format_is_refused_with_the_overwrite_hint(tmp_path):
    from dataeff.constants import SHARDS_FORMAT

    out = make_shards(tmp_path, n=4)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["format"] == SHARDS_FORMAT == "dataeff-shards/4"
    # What a dataeff-shards/3 run left: its signature did not include the new format id.
    summary.update(format="dataeff-shards/3", signature="0" * 64)
    (out / "summary.json").write_text(json.dumps(summary))
    with pytest.raises(ConfigError, match=r"format dataeff-shards/3.*overwrite=true"):
        shard_tree(tmp_path / "raw", out, min_side=8)
    assert shard_tree(tmp_path / "raw", out, min_side=8, overwrite=True)["format"] == SHARDS_FORMAT
    assert {"thumb", "group", "frame", "timestamp", "orientation"} <= set(pd.read_parquet(out / "index.parquet"))
