"""``dataeff demo-data``: deterministic, downstream and pool disjoint, truth covers the pool, videos decode."""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path

import pytest

from dataeff.config import ConfigError
from dataeff.constants import SPLIT_FORMAT
from dataeff.data.demo import DemoDataConfig, main
from dataeff.data.frames import FrameOptions
from dataeff.data.video import VideoFrames
from tests.fixtures import KVASIR


def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _video(source: str) -> str:
    """A truth row's video: the frame folder, or the video file for a ``<video>.mp4#<frame>`` row."""
    return source.split("#")[0] if "#" in source else source.rsplit("/", 1)[0]


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("demo") / "demo"
    main(DemoDataConfig(src=str(KVASIR), out=str(out)))
    return out


def test_two_builds_are_identical(built, tmp_path):
    other = tmp_path / "again"
    main(DemoDataConfig(src=str(KVASIR), out=str(other)))
    a, b = _tree(built), _tree(other)
    a.pop("config.yaml"), b.pop("config.yaml")  # holds `out`, which differs
    assert sorted(a) == sorted(b)
    assert all(a[k] == b[k] for k in a), "same seed must give the same bytes"
    seeded = tmp_path / "seed1"
    main(DemoDataConfig(src=str(KVASIR), out=str(seeded), seed=1, n_pool=20, n_near_duplicates=2, n_invalid=2))
    split0, split1 = (json.loads((d / "downstream" / "split.json").read_text()) for d in (built, seeded))
    assert split0["test"] != split1["test"], "the seed must matter"


def test_downstream_split_and_pool_are_disjoint(built):
    split = json.loads((built / "downstream" / "split.json").read_text())
    assert split["format"] == SPLIT_FORMAT and split["seed"] == 0 and split["groups"] is None
    assert [len(split[k]) for k in ("train", "val", "test")] == [140, 30, 30]
    held = split["train"] + split["val"] + split["test"]
    assert len(set(held)) == 200
    for stem in held:
        image = built / "downstream" / "images" / f"{stem}.jpg"
        assert image.read_bytes() == (KVASIR / "images" / f"{stem}.jpg").read_bytes()
        assert (built / "downstream" / "masks" / f"{stem}.png").is_file()
    # by source id: the pool's original files are byte copies of the other 800 source images (less the
    # frames filmed into videos, which are re-encoded)
    truth = list(csv.DictReader(open(built / "pool_truth.csv")))
    originals = [r for r in truth if r["kind"] == "original" and "#" not in r["source"]]
    pool_originals = {_sha((built / "pool" / r["source"]).read_bytes()) for r in originals}
    sources = {p.stem: _sha(p.read_bytes()) for p in (KVASIR / "images").glob("*.jpg")}
    assert len(pool_originals) == len(originals) > 700
    assert pool_originals <= {h for s, h in sources.items() if s not in set(held)}
    assert not pool_originals & {sources[s] for s in held}
    summary = json.loads((built / "summary.json").read_text())
    assert not set(summary["pool_sources"]) & set(held) and len(summary["pool_sources"]) == 800


def test_truth_covers_every_pool_file_and_counts_match(built):
    rows = list(csv.DictReader(open(built / "pool_truth.csv")))
    assert list(rows[0]) == ["source", "planted", "kind", "twin"]
    files = sorted(p.relative_to(built / "pool").as_posix() for p in (built / "pool").rglob("*") if p.is_file())
    assert sorted({r["source"].split("#")[0] for r in rows}) == files
    videos = [f for f in files if f.endswith(".mp4")]
    assert len(videos) == 3 and all(len(f.split("/")) == (2 if f in videos else 3) for f in files)
    for video in videos:  # every frame the truth names decodes, numbered as the truth numbers them
        named = [int(r["source"].split("#")[1]) for r in rows if r["source"].startswith(video + "#")]
        frames = VideoFrames(built / "pool" / video, FrameOptions())
        assert [f.index for f in frames] == sorted(named) == list(range(len(named))) and frames.lost == 0
    kinds: dict[str, int] = {}
    for r in rows:
        kinds[r["kind"]] = kinds.get(r["kind"], 0) + 1
    assert kinds["original"] == 800
    assert sum(kinds[k] for k in ("shift", "crop", "brightness", "reencode")) == 150
    assert sum(kinds[k] for k in ("black", "overexposed", "blur")) == 60
    assert kinds["truncated"] == 5 and kinds["not_image"] == 5
    by_source = {r["source"]: r for r in rows}
    for r in rows:
        if r["planted"] == "near_duplicate":
            twin = by_source[r["twin"]]
            assert twin["kind"] == "original" and _video(twin["source"]) == _video(r["source"])
        else:
            assert r["twin"] == ""
        assert r["planted"] == {"original": "none", "shift": "near_duplicate", "crop": "near_duplicate",
                                "brightness": "near_duplicate", "reencode": "near_duplicate"}.get(r["kind"], "invalid")  # fmt: skip


def test_rerun_skips_and_other_settings_are_refused(built, capsys):
    stamp = (built / "pool_truth.csv").stat().st_mtime_ns
    main(DemoDataConfig(src=str(KVASIR), out=str(built)))
    assert (built / "pool_truth.csv").stat().st_mtime_ns == stamp
    assert "downstream: 200 image/mask pairs" in capsys.readouterr().out
    with pytest.raises(ConfigError, match="overwrite=true"):
        main(DemoDataConfig(src=str(KVASIR), out=str(built), seed=3))
    with pytest.raises(ConfigError, match="n_val"):
        DemoDataConfig(n_downstream=10, n_val=5, n_test=5)
