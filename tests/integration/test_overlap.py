"""``dataeff overlap`` on real Kvasir images with planted copies of pool samples.

Pool: the first 24 Kvasir-SEG images at 48 px, sharded and embedded by the tiny random
encoder. Downstream dataset (images/ + masks/): an exact byte copy, a lossless PNG
re-save, a 0.7x resize and a JPEG q60 re-encode of four pool images, four Kvasir images
that are not in the pool, an undecodable file and a stray text file.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from dataeff import overlap_core as core
from dataeff.config import ConfigError, load_config, to_dict
from dataeff.constants import DOWNSTREAM_OVERLAP
from dataeff.data.stream import read_index
from dataeff.overlap import OverlapConfig, main
from tests.fixtures import kvasir_images, make_embedded_pool, small_jpeg

# The tiny encoder is random: different Kvasir frames reach cosine 0.999 under it, so the
# embedding threshold here only lets (near-)identical pixels through.
STRICT_COSINE = 0.9999


def _save(img: Image.Image, path: Path, **kwargs) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, **kwargs)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("overlap")
    pool = make_embedded_pool(tmp)
    index = read_index(pool["shards"])
    key_of = {Path(s).stem: k for s, k in zip(index["source"], index["key"], strict=True)}
    raw = {p.stem: p for p in (tmp / "raw").rglob("*.jpg")}
    stems = sorted(raw)
    root = tmp / "downstream"
    images, masks = root / "images", root / "masks"
    planted = {}  # downstream file -> (pool key, expected kind)

    def plant(name: str, stem: str, kind: str, write) -> None:
        write(images / name)
        planted[f"images/{name}"] = (key_of[stem], kind)

    images.mkdir(parents=True)
    plant("copy.jpg", stems[0], "exact", lambda p: p.write_bytes(raw[stems[0]].read_bytes()))
    plant("resave.png", stems[1], "exact", lambda p: _save(Image.open(raw[stems[1]]).convert("RGB"), p))
    small = Image.open(raw[stems[2]]).convert("RGB")
    resized = small.resize((round(small.width * 0.7), round(small.height * 0.7)), Image.Resampling.BICUBIC)
    plant("resized.png", stems[2], "phash", lambda p: _save(resized, p))
    plant("requality.jpg", stems[3], "phash", lambda p: _save(Image.open(raw[stems[3]]), p, quality=60))
    clean = [p for p in kvasir_images(120)[100:]][:4]  # not among the pool's first 24
    for path in clean:
        (images / f"clean_{path.stem}.jpg").write_bytes(small_jpeg(path, 48))
    (images / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (images / "notes.txt").write_text("not an image")
    masks.mkdir()
    for path in images.iterdir():
        _save(Image.new("L", (48, 40)), masks / f"{path.stem}.png")
    return {**pool, "root": root, "planted": planted, "clean": [f"images/clean_{p.stem}.jpg" for p in clean]}


def _cfg(setup, out: Path, **extra) -> OverlapConfig:
    overrides = [f"embeddings={setup['embeddings']}", f"datasets.polyps={setup['root']}", f"out={out}"]
    overrides += [f"{k}={v}" for k, v in extra.items()]
    return load_config(OverlapConfig, None, overrides)


def test_planted_overlaps_found_with_their_kind_and_clean_images_untouched(setup, tmp_path):
    out = tmp_path / "overlap"
    summary = main(_cfg(setup, out, min_cosine=STRICT_COSINE))
    matches = pd.read_parquet(out / "matches.parquet")
    found = {r.file: (r.pool_key, r.kind) for r in matches.itertuples()}
    assert found == setup["planted"], matches  # each planted file -> its pool image, right kind; nothing else
    assert not set(matches["file"]) & set(setup["clean"])
    rows = matches.set_index("file")
    # Re-embedding with the encoder rebuilt from the header reproduces the pool vector.
    assert rows.at["images/copy.jpg", "cosine"] == pytest.approx(1.0, abs=2e-3)
    assert rows.at["images/copy.jpg", "phash_distance"] == 0
    assert rows.at["images/copy.jpg", "signals"].split("+")[:2] == ["exact", "phash"]  # each kind once
    for name in ("images/resized.png", "images/requality.jpg"):
        assert rows.at[name, "phash_distance"] <= 4 and rows.at[name, "thumb_corr"] >= 0.99

    files = pd.read_parquet(out / "files.parquet").set_index("file")
    assert len(files) == 10  # every file of images/ accounted for
    assert files.at["images/broken.jpg", "status"] == "unreadable" and files.at["images/broken.jpg", "reason"]
    assert files.at["images/notes.txt", "status"] == "skipped"
    assert files["matched"].sum() == 4
    assert summary["files"]["polyps"] == {"ok": 8, "unreadable": 1, "skipped": 1}
    assert summary["counts"]["polyps"] == {
        "pairs": 4, "files": 4, "pool_keys": 4, "exact": 2, "phash": 2, "embedding": 0,
    }  # fmt: skip
    assert {r["file"] for r in summary["not_compared"]} == {"images/broken.jpg", "images/notes.txt"}
    assert summary["inputs"]["thresholds"]["min_cosine"] == STRICT_COSINE
    assert json.loads((out / "summary.json").read_text()) == summary
    assert (out / "config.yaml").is_file() and (out / "matches.csv").is_file()
    sheet = Image.open(out / "overlap.png")
    assert sheet.height > 4 * 128 and sheet.width > 256


def _excluded(cfg: OverlapConfig, kinds: tuple[str, ...] = core.KINDS) -> set[str]:
    main(cfg)  # a no-op when cfg.out already holds the result for the same inputs
    return core.excluded_keys(pd.read_parquet(Path(cfg.out) / "matches.parquet"), kinds)


def test_rerun_is_skipped_and_sweep_gets_the_keys(setup, tmp_path):
    out = tmp_path / "overlap"
    cfg = _cfg(setup, out, min_cosine=STRICT_COSINE)
    keys = _excluded(cfg)
    assert keys == {k for k, _ in setup["planted"].values()}
    assert DOWNSTREAM_OVERLAP == "downstream_overlap"
    stamp = (out / "matches.parquet").stat().st_mtime_ns
    assert _excluded(cfg) == keys  # same inputs: nothing recomputed
    assert (out / "matches.parquet").stat().st_mtime_ns == stamp
    assert _excluded(cfg, kinds=("exact",)) == {
        setup["planted"][f][0] for f in ("images/copy.jpg", "images/resave.png")
    }
    # A changed threshold reruns, on the pool signatures stored in the shard index (no cache file).
    main(_cfg(setup, out, min_cosine=STRICT_COSINE, phash_max_distance=0))
    assert (out / "matches.parquet").stat().st_mtime_ns != stamp
    assert not list(out.glob("*.npz"))


def test_pool_index_without_signatures_asks_to_reshard(setup, tmp_path, monkeypatch):
    import shutil

    import dataeff.overlap as overlap

    old = tmp_path / "old_pool"
    shutil.copytree(setup["shards"], old)
    index = pd.read_parquet(old / "index.parquet")
    index.drop(columns=["pixel_sha256", "phash", "thumb"]).to_parquet(old / "index.parquet")  # dataeff-shards/2
    decoded = []
    monkeypatch.setattr(overlap.sig, "image_signature", lambda *a: decoded.append(1))  # no pool decode either
    with pytest.raises(ConfigError, match=rf"{old}.*re-shard"):
        main(_cfg(setup, tmp_path / "o", pool=str(old)))
    assert not decoded


def test_embedding_signal_alone_finds_the_identical_images(setup, tmp_path):
    out = tmp_path / "emb"
    main(_cfg(setup, out, signals="[embedding]", min_cosine=0.999))
    matches = pd.read_parquet(out / "matches.parquet")
    assert set(matches["kind"]) == {"embedding"}
    assert {"images/copy.jpg", "images/resave.png"} <= set(matches["file"])
    assert not set(matches["file"]) & set(setup["clean"])
    assert np.all(matches["cosine"] >= 0.999)


def test_bad_inputs_name_the_fix(setup, tmp_path):
    with pytest.raises(ConfigError, match="datasets"):
        load_config(OverlapConfig, None, [f"embeddings={setup['embeddings']}", f"out={tmp_path}"])
    with pytest.raises(ConfigError, match="signals"):
        _cfg(setup, tmp_path, signals="[near]")
    with pytest.raises(ConfigError, match="no such directory"):
        main(
            load_config(
                OverlapConfig,
                None,
                [f"embeddings={setup['embeddings']}", f"datasets.x={tmp_path}/nope", f"out={tmp_path}/o"],
            )
        )
    other = setup["tmp"] / "other_pool"
    from tests.fixtures import make_shards

    shards = make_shards(other, n=10, size=48, samples_per_shard=5)
    with pytest.raises(ConfigError, match="not the shard set"):
        main(_cfg(setup, tmp_path / "o2", pool=str(shards)))
    assert to_dict(_cfg(setup, tmp_path))["datasets"] == {"polyps": str(setup["root"])}
