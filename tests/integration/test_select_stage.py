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
