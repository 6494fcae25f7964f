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
from dataeff.data.keys import make_key, site_of
from dataeff.data.quality import quality_stats, wide_to_uint8
from dataeff.data.shard import ShardConfig, _header, _tarfile_header, main, plan_shards, tar_member
from tests.fixtures import REPO, kvasir_images, make_raw_tree, make_shards, small_jpeg


def _shard(src: Path, out: Path, **kw) -> dict:
    settings = {"workers": 1, "progress": False, "min_side": 16, "samples_per_shard": 8}
    settings.update(kw)
    return main(ShardConfig(src=str(src), out=str(out), **settings))


def _tar_samples(out: Path) -> dict[str, dict[str, bytes]]:
    samples: dict[str, dict[str, bytes]] = {}
    for tar_path in sorted(out.glob("*.tar")):
        with tarfile.open(tar_path) as tar:
            for m in tar.getmembers():
                key, ext = m.name.split(".", 1)
                samples.setdefault(key, {})[ext] = tar.extractfile(m).read()
    return samples


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _jpeg(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


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


def test_plan_shards_by_count_and_bytes():
    assert plan_shards([10] * 5, max_count=2, max_bytes=10**6) == [[0, 1], [2, 3], [4]]
    # bytes: 40 + 40 > 70 opens a new shard; a sample larger than the limit gets its own
    assert plan_shards([40, 40, 20, 200, 10], max_count=100, max_bytes=70) == [[0], [1, 2], [3], [4]]
    assert plan_shards([], max_count=2, max_bytes=10) == []


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


# --------------------------------------------------------------------------- bad inputs


def _bad_tree(root: Path) -> dict[str, str]:
    """A tree with good, convertible and broken files; returns source -> expected reason ('' = ok)."""
    good = [small_jpeg(p, 48) for p in kvasir_images(3)]
    photo = Image.open(io.BytesIO(good[0])).convert("RGB")
    ramp16 = (np.tile(np.linspace(0, 65535, 40), (40, 1))).astype(np.uint16)
    png_good = _png(photo)
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
        "b/tiny.png": (_png(photo.resize((10, 10))), "too_small"),
        "b/bomb.png": (_png(Image.new("RGB", (800, 800), (9, 9, 9))), "decompression_bomb"),
        "b/float.tif": (b"", "unreadable_mode"),  # filled below (needs TIFF encoding)
        "b/notes.txt": (b"frame list\n", "unsupported_extension"),
        "c/cmyk.jpg": (_jpeg(photo.convert("CMYK")), ""),
        "c/palette.png": (_png(photo.convert("P")), ""),
        "c/gray16.png": (_png(Image.fromarray(ramp16)), ""),
        "c/gray.jpg": (_jpeg(photo.convert("L")), ""),
        "c/gray_alpha.png": (_png(photo.convert("LA")), ""),
        "c/rgba.png": (_png(photo.convert("RGBA")), ""),
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
    summary = _shard(tmp_path / "raw", tmp_path / "out", max_pixels=100_000)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True, "the PIL setting must be restored afterwards"

    index = pd.read_parquet(tmp_path / "out" / "index.parquet")
    assert index["source"].tolist() == sorted(expected), "one row per input file, sorted by source"
    got = dict(zip(index["source"], index["reason"], strict=False))
    assert got == expected
    status = dict(zip(index["source"], index["status"], strict=False))
    assert status["a/zz_dup_of_good0.jpg"] == "duplicate"
    assert status["c/cmyk.jpg"] == "ok" and status["b/cut.jpg"] == "rejected"

    samples = _tar_samples(tmp_path / "out")
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
    first = _shard(raw, raw / "shards" / "x")
    again = _shard(raw, raw / "shards" / "x")
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
    _shard(raw, tmp_path / "out", samples_per_shard=3)
    index = pd.read_parquet(tmp_path / "out" / "index.parquet")
    stored = _tar_samples(tmp_path / "out")
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
    _shard(raw, tmp_path / "out", keep_duplicates=True)
    index = pd.read_parquet(tmp_path / "out" / "index.parquet").set_index("source")
    row = index.loc["zz_copy.jpg"]
    assert row["status"] == "ok" and row["reason"].startswith("exact_duplicate_of:") and row["shard"]
    assert len(_tar_samples(tmp_path / "out")) == 5


def test_resize_long_side(tmp_path):
    out = make_shards(tmp_path, n=6, size=64, max_side=32)
    index = pd.read_parquet(out / "index.parquet")
    assert (index[["width", "height"]].max(axis=1) == 32).all()
    for parts in _tar_samples(out).values():
        assert max(Image.open(io.BytesIO(parts["jpg"])).size) == 32


# --------------------------------------------------------------------------- determinism and idempotence


def test_same_bytes_whatever_the_worker_count(tmp_path):
    raw = make_raw_tree(tmp_path / "raw", n=40, size=40, sites=3)
    (raw / "site0" / "broken.jpg").write_bytes(b"not a jpeg")
    shutil.copy(sorted(raw.rglob("*.jpg"))[3], raw / "copy.jpg")
    # ~3 KiB per sample in the tar: the byte cap (15 KiB) binds before the count cap (6)
    one = _shard(raw, tmp_path / "w1" / "set", workers=1, samples_per_shard=6, max_shard_mb=0.015)
    two = _shard(raw, tmp_path / "w2" / "set", workers=2, chunksize=2, samples_per_shard=6, max_shard_mb=0.015)
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
        _shard(tmp_path / "raw", out, min_side=8, workers=2)
    assert "already complete" in caplog.text
    assert tar.stat().st_mtime_ns == stamp
    with pytest.raises(ConfigError, match="overwrite=true"):
        _shard(tmp_path / "raw", out, min_side=8, max_side=16)
    summary = _shard(tmp_path / "raw", out, min_side=8, max_side=16, overwrite=True)
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
