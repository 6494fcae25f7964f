"""``dataeff shard`` on videos, DICOM and multi-page TIFFs beside still images: frames as samples."""

from __future__ import annotations

import io
import json
import logging
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from dataeff.constants import INDEX_NAME, PROVENANCE_KEYS, SHARDS_FORMAT
from dataeff.data import shard
from dataeff.data.shard import ShardConfig, main
from tests.fixtures import REPO
from tests.media_files import (
    PHI,
    frames_of,
    tiff_bytes,
    write_dicom,
    write_dicom_with_syntax,
    write_video,
)

MPEG4_AVC = "1.2.840.10008.1.2.4.102"  # a DICOM video syntax pydicom has no decoder for


def _cfg(src: Path, out: Path, *args: str, **kw) -> ShardConfig:
    from dataeff.config import load_config

    base = [f"src={src}", f"out={out}", "workers=1", "min_side=16", "progress=false", *args]
    return load_config(ShardConfig, None, base + [f"{k}={v}" for k, v in kw.items()])


def _index(out: Path) -> pd.DataFrame:
    return pd.read_parquet(out / INDEX_NAME)


def _members(out: Path) -> dict[str, bytes]:
    found = {}
    for tar in sorted(out.glob("*.tar")):
        with tarfile.open(tar) as tf:
            for m in tf.getmembers():
                found[m.name] = tf.extractfile(m).read()  # type: ignore[union-attr]
    return found


@pytest.fixture
def video_tree(tmp_path: Path) -> Path:
    src = tmp_path / "src" / "centre1"
    src.mkdir(parents=True)
    for seed, ext in enumerate(("mp4", "avi", "mkv", "mov")):  # the same frames twice would be duplicates
        write_video(src / f"clip.{ext}", frames_of(6, seed=seed))
    Image.fromarray(frames_of(1, seed=9)[0]).save(src / "still.png")
    (src / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"garbage" * 50)
    return tmp_path / "src"


def test_videos_become_frame_samples_with_provenance(video_tree: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    summary = main(_cfg(video_tree, out, "video.every_n=2"))
    index = _index(out)
    assert summary["format"] == SHARDS_FORMAT and summary["num_files"] == 6
    assert set(PROVENANCE_KEYS) <= set(index.columns)
    for ext in ("mp4", "avi", "mkv", "mov"):
        rows = index[index["source"] == f"centre1/clip.{ext}"]
        assert rows["frame"].tolist() == [0, 2, 4] and (rows["status"] == "ok").all()
        assert rows["timestamp"].tolist() == pytest.approx([0.0, 0.2, 0.4])
        assert (rows["group"] == f"centre1/clip.{ext}").all() and rows["site"].eq("centre1").all()
        assert rows["key"].str.match(rf"^centre1_clip_{ext}-[0-9a-f]{{8}}-f00000[024]$").all()
        assert (rows["width"] == 96).all() and rows["laplacian_var"].gt(0).all()  # the still-image checks ran
    broken = index[index["source"] == "centre1/broken.mp4"]
    assert broken[["status", "reason", "frame"]].values.tolist() == [["rejected", "video_undecodable", -1]]
    still = index[index["source"] == "centre1/still.png"].iloc[0]
    assert still["group"] == "centre1/still.png" and still["frame"] == -1 and pd.isna(still["timestamp"])
    assert summary["frames"] == {"files": 4, "rows": 12, "lost": 0}
    members = _members(out)
    key = index[(index["source"] == "centre1/clip.mp4") & (index["frame"] == 2)]["key"].iloc[0]
    meta = json.loads(members[f"{key}.json"])
    assert (meta["frame"], meta["timestamp"], meta["group"]) == (2, 0.2, "centre1/clip.mp4")
    decoded = np.asarray(Image.open(io.BytesIO(members[f"{key}.jpg"])).convert("L"), dtype=int)
    assert np.abs(decoded - np.asarray(Image.fromarray(frames_of(6)[2]).convert("L"))).mean() < 6  # MPEG-4, JPEG


def test_fps_and_max_frames(video_tree: Path, tmp_path: Path) -> None:
    main(_cfg(video_tree, tmp_path / "a", "video.fps=4", "video.max_frames=2", "video.extensions=[.mp4]"))
    index = _index(tmp_path / "a")
    assert index.loc[index["source"] == "centre1/clip.mp4", "frame"].tolist() == [0, 3]  # 10 fps: slots of 0.25 s
    avi = index[index["source"] == "centre1/clip.avi"]
    assert avi["reason"].tolist() == ["unsupported_extension"]  # not a video by config, not an image


def test_partly_decodable_video_keeps_its_frames_and_counts_the_rest(tmp_path: Path, caplog) -> None:
    src = tmp_path / "src"
    src.mkdir()
    data = write_video(tmp_path / "whole.mp4", frames_of(20), faststart=True).read_bytes()
    (src / "cut.mp4").write_bytes(data[: len(data) * 6 // 10])
    with caplog.at_level(logging.WARNING, logger="dataeff"):
        summary = main(_cfg(src, tmp_path / "out"))
    index = _index(tmp_path / "out")
    kept = index[index["status"] == "ok"]
    lost = index[index["reason"].str.startswith("frames_lost:")]
    assert 0 < len(kept) < 20 and kept["frame"].tolist() == list(range(len(kept)))
    assert lost["reason"].tolist() == [f"frames_lost:{20 - len(kept)}"] and lost["status"].tolist() == ["rejected"]
    assert summary["frames"]["lost"] == 20 - len(kept) and summary["counts_by_reason"] == {"frames_lost": 1}
    assert "cut.mp4" in caplog.text and "could not be decoded" in caplog.text


def test_multipage_tiff_pages_are_frames(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    rgb = frames_of(1)[0]
    (src / "stack.tif").write_bytes(tiff_bytes("multipage", rgb))
    (src / "mib.tif").write_bytes(tiff_bytes("minisblack3", rgb[:, ::-1].copy()))
    main(_cfg(src, tmp_path / "out"))
    index = _index(tmp_path / "out").set_index("key")
    assert index.loc[index["source"] == "stack.tif", "frame"].tolist() == [0, 1]
    assert index.loc[index["source"] == "mib.tif", "status"].tolist() == ["ok"]
    members = _members(tmp_path / "out")
    pages = [
        np.asarray(Image.open(io.BytesIO(members[f"{k}.png"]))) for k in index.index[index["source"] == "stack.tif"]
    ]
    assert np.array_equal(pages[0], rgb) and np.array_equal(pages[1], rgb[::-1])


def test_resume_inside_a_video_gives_identical_output(video_tree: Path, tmp_path: Path, monkeypatch) -> None:
    args = ("samples_per_shard=4", "name=pool")  # 6-frame videos: a video's frames end one shard, start the next
    clean = main(_cfg(video_tree, tmp_path / "clean", *args))
    close, calls = shard._Packer.close, []

    def close_then_die(self) -> None:
        close(self)
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # killed right after the second shard was journalled

    monkeypatch.setattr(shard._Packer, "close", close_then_die)
    with pytest.raises(KeyboardInterrupt):
        main(_cfg(video_tree, tmp_path / "killed", *args))
    monkeypatch.undo()
    journal = json.loads((tmp_path / "killed" / ".parts" / "pool-000001.tar.json").read_text())
    assert journal["skip"] > 0, "the test must cut inside a video"
    resumed = main(_cfg(video_tree, tmp_path / "killed", *args))
    assert resumed["num_samples"] == clean["num_samples"]
    assert {k: v for k, v in resumed.items() if k != "config"} == {k: v for k, v in clean.items() if k != "config"}
    for name in [INDEX_NAME, *(p.name for p in (tmp_path / "clean").glob("*.tar"))]:
        assert (tmp_path / "killed" / name).read_bytes() == (tmp_path / "clean" / name).read_bytes(), name


# --------------------------------------------------------------------------- DICOM


@pytest.fixture
def dicom_tree(tmp_path: Path) -> Path:
    src = tmp_path / "src" / "site"
    src.mkdir(parents=True)
    rgb = frames_of(4, seed=1)
    write_dicom(src / "endo_multi.dcm", rgb, uid_seed=1)  # VL Endoscopic, multi-frame, RGB
    write_dicom(src / "endo_single.dcm", rgb[:1], uid_seed=2)
    write_dicom(src / "IM000003", rgb[:3], compressed=True, uid_seed=3)  # JPEG Baseline, no extension
    gray = np.random.default_rng(2).integers(200, 3800, (1, 64, 80)).astype(np.uint16)
    write_dicom(src / "gray12.dcm", gray, sop_class="1.2.840.10008.5.1.4.1.1.7", uid_seed=4)
    write_dicom_with_syntax(src / "video.dcm", MPEG4_AVC, uid_seed=5)
    (src / "bad.dcm").write_bytes(b"\x00" * 128 + b"DICM" + b"\xff" * 40)
    return tmp_path / "src"


def test_dicom_frames_are_samples(dicom_tree: Path, tmp_path: Path) -> None:
    main(_cfg(dicom_tree, tmp_path / "out"))
    index = _index(tmp_path / "out")
    by_source = {s: g for s, g in index.groupby("source")}
    assert by_source["site/endo_multi.dcm"]["frame"].tolist() == [0, 1, 2, 3]
    assert by_source["site/endo_multi.dcm"]["timestamp"].tolist() == pytest.approx([0, 0.04, 0.08, 0.12])
    assert by_source["site/IM000003"]["frame"].tolist() == [0, 1, 2]
    assert (by_source["site/IM000003"]["status"] == "ok").all()
    assert by_source["site/gray12.dcm"]["status"].tolist() == ["ok"]
    assert by_source["site/video.dcm"]["reason"].tolist() == ["dicom_unsupported_transfer_syntax"]
    assert by_source["site/bad.dcm"]["reason"].tolist() == ["dicom_unreadable"]
    ok = index[index["status"] == "ok"]
    assert ok["key"].str.match(r"^dicom-[0-9a-f]{16}-f\d{6}$").all()
    assert ok["group"].str.match(r"^dicom-study-[0-9a-f]{16}$").all() and ok["group"].nunique() == 1
    members = _members(tmp_path / "out")
    key = by_source["site/endo_multi.dcm"]["key"].iloc[1]
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(members[f"{key}.png"]))), frames_of(4, seed=1)[1])
    gray_key = by_source["site/gray12.dcm"]["key"].iloc[0]
    gray = np.asarray(Image.open(io.BytesIO(members[f"{gray_key}.png"])))[:, :, 0]
    assert 10 < gray.min() and gray.max() < 245  # 12 bits scaled to the full 8-bit range, not clipped


def test_no_patient_identifier_reaches_any_output(dicom_tree: Path, tmp_path: Path) -> None:
    """Keys, index, tars, summary, config and the logs of a verbose run hold no PHI value or raw UID."""
    import pydicom

    secrets = list(PHI.values())
    for path in dicom_tree.rglob("*"):
        if path.is_file() and path.name != "bad.dcm":
            ds = pydicom.dcmread(path, force=True)
            secrets += [str(ds.SOPInstanceUID), str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID)]
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "dataeff", "-v", "shard", f"src={dicom_tree}", f"out={out}", "min_side=16"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    blobs = {p.relative_to(out).as_posix(): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    blobs["<stdout>"], blobs["<stderr>"] = proc.stdout.encode(), proc.stderr.encode()
    assert INDEX_NAME in blobs and any(n.endswith(".tar") for n in blobs)
    for value in secrets:
        for variant in {value, value.replace("^", " "), value.split("^")[0]}:
            leaks = [name for name, blob in blobs.items() if variant.encode() in blob]
            assert not leaks, f"{variant!r} found in {leaks}"


def test_frames_exported_for_annotation_split_by_their_video(video_tree: Path, tmp_path: Path) -> None:
    """data.groups=<shard dir>: downstream images named by sample key are grouped by the index's group."""
    from dataeff.data import downstream

    out = tmp_path / "shards"
    main(_cfg(video_tree, out))
    members = _members(out)
    ok = _index(out).query("status == 'ok' and frame >= 0")
    root = tmp_path / "annotated"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for key in ok["key"]:
        (root / "images" / f"{key}.jpg").write_bytes(members[f"{key}.jpg"])
        Image.new("L", (96, 72)).save(root / "masks" / f"{key}.png")
    pairs = downstream.find_pairs(root, "generic")
    group_of = downstream.read_groups(str(out), pairs)
    assert group_of == dict(zip(ok["key"], ok["group"], strict=True))
    split = downstream.split_groups(group_of, 0.25, 0.25, seed=0, spec=str(out))
    parts = {part: {group_of[s] for s in split[part]} for part in ("train", "val", "test")}
    assert all(parts[a].isdisjoint(parts[b]) for a, b in (("train", "val"), ("train", "test"), ("val", "test")))
    (root / "images" / "stray.jpg").write_bytes(members[f"{ok['key'].iloc[0]}.jpg"])
    (root / "masks" / "stray.png").write_bytes((root / "masks" / f"{ok['key'].iloc[0]}.png").read_bytes())
    with pytest.raises(ValueError, match="not sample keys.*'stray'"):
        downstream.read_groups(str(out / INDEX_NAME), downstream.find_pairs(root, "generic"))
