"""The embed and select stages on real (tiny) shards: outputs, resume, bad input."""

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from dataeff.config import ConfigError, load_config
from dataeff.select import embed, stage
from dataeff.select.manifest import read_selection
from tests.fixtures import make_shards

REPO = Path(__file__).resolve().parents[2]


def embed_cfg(shards, out, *extra):
    return load_config(
        embed.EmbedConfig, str(REPO / "configs/embed/tiny.yaml"), [f"data.shards={shards}", f"out={out}", *extra]
    )


def select_cfg(emb, out, *extra):
    return load_config(
        stage.SelectConfig, str(REPO / "configs/select/tiny.yaml"), [f"embeddings={emb}", f"out={out}", *extra]
    )


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pool")
    shards = make_shards(tmp, n=24, size=48, samples_per_shard=8)
    embed.main(embed_cfg(shards, tmp / "emb"))
    return shards, tmp / "emb"


def test_embed_writes_unit_float16_rows_for_every_ok_sample(pool):
    shards, emb = pool
    header = json.loads((emb / "header.json").read_text())
    assert header["format"] == "dataeff-embeddings/1" and header["dim"] == 64 and header["count"] == 24
    keys, x = embed.load_embeddings(emb)
    index = pd.read_parquet(shards / "index.parquet")
    assert sorted(index.loc[index["status"] == "ok", "key"]) == keys.tolist()
    np.testing.assert_allclose(np.linalg.norm(x, axis=1), 1.0, atol=2e-3)
    assert not (emb / "parts").exists()


def test_embed_resumes_per_shard(tmp_path, pool, monkeypatch):
    shards, reference = pool
    calls = []
    real = embed.embed_batch

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # batch size 16 > 8 per shard: one call per shard; die in the second shard
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(embed, "embed_batch", flaky)
    with pytest.raises(KeyboardInterrupt):
        embed.main(embed_cfg(shards, tmp_path / "emb"))
    assert (
        len(list((tmp_path / "emb" / "parts").glob("*.npz"))) == 1 and not (tmp_path / "emb" / "header.json").exists()
    )
    calls.clear()
    monkeypatch.setattr(embed, "embed_batch", real)
    counted = []
    monkeypatch.setattr(embed, "embed_batch", lambda *a, **k: counted.append(1) or real(*a, **k))
    embed.main(embed_cfg(shards, tmp_path / "emb"))
    assert len(counted) == 2  # only the two unfinished shards
    k1, x1 = embed.load_embeddings(tmp_path / "emb")
    k0, x0 = embed.load_embeddings(reference)
    assert (k0 == k1).all() and np.array_equal(x0, x1)


def test_embed_refuses_random_encoder_without_flag_and_empty_shard_set(tmp_path, pool):
    shards, _ = pool
    with pytest.raises(ConfigError, match="no encoder weights given"):
        embed.main(embed_cfg(shards, tmp_path / "e1", "encoder.allow_random_init=false"))
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "index.parquet").write_bytes(Path(shards / "index.parquet").read_bytes())
    with pytest.raises(ConfigError, match="empty shard set"):
        embed.main(embed_cfg(tmp_path / "empty", tmp_path / "e2"))


def test_select_writes_manifest_that_the_stream_reads(tmp_path, pool):
    from dataeff.data.stream import selection_keys

    _, emb = pool
    stage.main(select_cfg(emb, tmp_path / "sel", "ratio=0.25", "report.gallery=true"))
    frame, summary = read_selection(tmp_path / "sel")
    assert list(frame.columns) == ["key", "kept", "reason", "cluster", "score", "generated"]
    assert summary["format"] == "dataeff-selection/1" and summary["pool_size"] == 24 and summary["kept"] == 6
    assert summary["kept_fraction"] == 0.25 and sum(summary["counts_by_reason"].values()) == 24
    kept, generated = selection_keys(tmp_path / "sel")
    assert kept == set(frame.loc[frame["kept"], "key"]) and generated == []
    assert (tmp_path / "sel" / "config.yaml").is_file()
    assert all(Path(p).stat().st_size > 1000 for p in summary["gallery"])
    mtime = (tmp_path / "sel" / "summary.json").stat().st_mtime_ns
    stage.main(select_cfg(emb, tmp_path / "sel", "ratio=0.25"))  # complete -> skipped
    assert (tmp_path / "sel" / "summary.json").stat().st_mtime_ns == mtime


@pytest.mark.parametrize("method", ["full", "random", "semdedup"])
def test_baseline_methods_hit_ratio(tmp_path, pool, method):
    _, emb = pool
    stage.main(select_cfg(emb, tmp_path / method, f"method={method}", "ratio=0.5"))
    _, summary = read_selection(tmp_path / method)
    assert summary["kept"] == (24 if method == "full" else 12)


def test_bad_select_input_fails_before_work(tmp_path, pool):
    _, emb = pool
    for ratio in ("0", "1.5", "-0.1"):
        with pytest.raises(ConfigError, match="must be in \\(0, 1\\]"):
            select_cfg(emb, tmp_path / "x", f"ratio={ratio}")
    with pytest.raises(ConfigError, match="cluster.k=25 is larger than the pool"):
        stage.main(select_cfg(emb, tmp_path / "k", "cluster.k=25"))
    assert not (tmp_path / "k").exists()
    with pytest.raises(ConfigError, match="'method'.*'nope'"):
        select_cfg(emb, tmp_path / "x", "method=nope")
    # Mismatched embedding dimensions across rank files.
    bad = tmp_path / "bad"
    bad.mkdir()
    header = json.loads((emb / "header.json").read_text())
    np.savez(bad / "rank-00000.npz", keys=np.array(["a"]), embeddings=np.ones((1, 64), np.float16))
    np.savez(bad / "rank-00001.npz", keys=np.array(["b"]), embeddings=np.ones((1, 32), np.float16))
    (bad / "header.json").write_text(json.dumps({**header, "files": ["rank-00000.npz", "rank-00001.npz"]}))
    with pytest.raises(ConfigError, match="mismatched embedding dimensions"):
        stage.main(select_cfg(bad, tmp_path / "d"))


def hand_made_overlap(root: Path, emb: Path, keys: list[str], **inputs_override) -> Path:
    """A 'dataeff overlap' output written by hand: matches.parquet (match-table columns) + summary.json."""
    from dataeff.constants import OVERLAP_FORMAT
    from dataeff.overlap_core import MATCH_COLUMNS

    header = json.loads((emb / "header.json").read_text())
    out = root / "overlap"
    out.mkdir(parents=True, exist_ok=True)
    matches = pd.DataFrame(
        {
            "pool_key": keys,
            "dataset": "kvasir",
            "file": [f"images/{i}.jpg" for i in range(len(keys))],
            "kind": ["exact", "phash", "embedding"][: len(keys)],
            "signals": ["exact+phash", "phash", "embedding"][: len(keys)],
            "phash_distance": [0, 4, 20][: len(keys)],
            "thumb_corr": [1.0, 0.995, 0.7][: len(keys)],
            "cosine": [0.999, 0.99, 0.96][: len(keys)],
        },
        columns=list(MATCH_COLUMNS),
    )
    matches.to_parquet(out / "matches.parquet", index=False)
    inputs = {
        "embeddings": str(emb.resolve()),
        "encoder_sha256": header["encoder"]["sha256"],
        "shard_set_hash": header["shard_set_hash"],
        "signals": ["embedding", "exact", "phash"],
        **inputs_override,
    }
    (out / "summary.json").write_text(json.dumps({"format": OVERLAP_FORMAT, "inputs": inputs}))
    return out


@pytest.mark.parametrize("method", ["full", "random", "semdedup", "meddel"])
def test_every_method_drops_exactly_the_overlap_keys_before_selecting(tmp_path, pool, method):
    _, emb = pool
    keys, _ = embed.load_embeddings(emb)
    leaked = [str(keys[3]), str(keys[10]), str(keys[17])]
    overlap = hand_made_overlap(tmp_path, emb, leaked)
    out = tmp_path / method
    extra = ["report.gallery=true"] if method == "meddel" else []
    stage.main(select_cfg(emb, out, f"method={method}", "ratio=0.5", f"exclude={overlap}", *extra))
    frame, summary = read_selection(out)
    dropped = frame[frame["reason"] == "downstream_overlap"]
    assert sorted(dropped["key"]) == sorted(leaked) and not dropped["kept"].any()
    assert (dropped["cluster"] == -1).all() and dropped["score"].isna().all()
    # The method chose among the 21 eligible samples: round(0.5 * 21) = 11 (full: all 21).
    assert summary["pool_size"] == 24 and summary["excluded"] == 3 and summary["eligible"] == 21
    assert summary["kept"] == (21 if method == "full" else 11) and summary["target"] == 11
    assert summary["kept_fraction"] == summary["kept"] / 24
    assert summary["counts_by_reason"]["downstream_overlap"] == 3
    assert summary["inputs"]["exclude"] == str(overlap.resolve())
    assert len(summary["inputs"]["exclude_summary_sha256"]) == 64
    if method == "meddel":
        names = {Path(p).name for p in summary["gallery"]}
        assert "removed_downstream_overlap.png" in names and "clusters.png" in names
    # Partitioned, the excluded rows leave each rank's share in place: the same manifest.
    stage.main(
        select_cfg(emb, tmp_path / "part", f"method={method}", "ratio=0.5", f"exclude={overlap}", "gather=partitioned")
    )
    pd.testing.assert_frame_equal(read_selection(tmp_path / "part")[0], frame)


def test_an_overlap_from_other_embeddings_is_refused_before_work(tmp_path, pool):
    _, emb = pool
    keys, _ = embed.load_embeddings(emb)
    overlap = hand_made_overlap(tmp_path, emb, [str(keys[0])], shard_set_hash="0" * 16)
    with pytest.raises(ConfigError, match="another shard set"):
        stage.main(select_cfg(emb, tmp_path / "sel", f"exclude={overlap}"))
    assert not (tmp_path / "sel").exists()
    with pytest.raises(ConfigError, match="no complete 'dataeff overlap' output"):
        stage.main(select_cfg(emb, tmp_path / "sel", f"exclude={tmp_path / 'missing'}"))
