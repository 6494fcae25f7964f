"""Provenance on every resume and skip: an output made from other inputs or settings is refused, not mixed.

Each case resumes or re-runs a stage into an output made differently and expects one
line naming what differs and ``overwrite=true``; then ``overwrite=true`` redoes it.
Damaged finished outputs are redone, never skipped.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pandas as pd
import pytest

from dataeff import pretrain
from dataeff.config import ConfigError, load_config
from dataeff.select import embed, stage
from dataeff.select.manifest import read_selection
from tests.fixtures import jpeg_bytes, make_raw_tree, shard_tree, write_selection

REPO = Path(__file__).resolve().parents[2]


def embed_cfg(shards: Path, out: Path, *extra: str) -> embed.EmbedConfig:
    return load_config(
        embed.EmbedConfig, str(REPO / "configs/embed/tiny.yaml"), [f"data.shards={shards}", f"out={out}", *extra]
    )


def select_cfg(emb: Path, out: Path, *extra: str) -> stage.SelectConfig:
    overrides = [f"embeddings={emb}", f"out={out}", "method=random", *extra]
    return load_config(stage.SelectConfig, str(REPO / "configs/select/tiny.yaml"), overrides)


def pretrain_cfg(shards: Path, out: Path, *extra: str) -> pretrain.PretrainConfig:
    overrides = [f"data.shards={shards}", f"out={out}", "trainer.max_steps=2", "trainer.progress_bar=false"]
    overrides += ["data.batch_size=4", "panel_every_n_steps=0", "optim.warmup_steps=1", "wandb.enabled=false"]
    return load_config(pretrain.PretrainConfig, str(REPO / "configs/pretrain/tiny.yaml"), [*overrides, *extra])


def _ok_keys(shards: Path) -> list[str]:
    index = pd.read_parquet(shards / "index.parquet")
    return sorted(index.loc[index["status"] == "ok", "key"])


@pytest.fixture(scope="module")
def pools(tmp_path_factory):
    """Two pools with the same relative paths and tar names; in pool B one picture is another one."""
    tmp = tmp_path_factory.mktemp("pools")
    raw_a = make_raw_tree(tmp / "a" / "raw", n=16, size=40)
    raw_b = make_raw_tree(tmp / "b" / "raw", n=16, size=40)
    first = sorted(raw_b.rglob("*.jpg"))[0]
    from PIL import Image

    with Image.open(first) as img:
        first.write_bytes(jpeg_bytes(img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)))
    a, b = tmp / "a" / "shards" / "pool", tmp / "b" / "shards" / "pool"
    shard_tree(raw_a, a)
    shard_tree(raw_b, b)
    assert _ok_keys(a) == _ok_keys(b)
    embed.main(embed_cfg(a, tmp / "emb"))
    return {"tmp": tmp, "a": a, "b": b, "emb": tmp / "emb"}


def test_embed_resumed_with_another_encoder_is_refused(pools, tmp_path, monkeypatch):
    real, calls = embed.embed_batch, []

    def dies_in_second_shard(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    out = tmp_path / "emb"
    monkeypatch.setattr(embed, "embed_batch", dies_in_second_shard)
    with pytest.raises(KeyboardInterrupt):
        embed.main(embed_cfg(pools["a"], out))
    monkeypatch.setattr(embed, "embed_batch", real)
    assert len(list((out / "parts").glob("*.npz"))) == 1
    with pytest.raises(ConfigError, match=r"encoder\.depth=2 \(now 1\).*overwrite=true"):
        embed.main(embed_cfg(pools["a"], out, "encoder.depth=1"))
    with pytest.raises(ConfigError, match=r"another data\.shards.*overwrite=true"):
        embed.main(embed_cfg(pools["b"], out))
    embed.main(embed_cfg(pools["a"], out, "encoder.depth=1", "overwrite=true"))
    header = json.loads((out / "header.json").read_text())
    assert header["encoder"]["config"]["depth"] == 1 and header["count"] == 16
    reference = tmp_path / "clean"
    embed.main(embed_cfg(pools["a"], reference, "encoder.depth=1"))
    assert (out / "rank-00000.npz").read_bytes() == (reference / "rank-00000.npz").read_bytes()


def test_select_rerun_with_another_config_into_a_finished_dir_is_refused(pools, tmp_path):
    out = tmp_path / "sel"
    stage.main(select_cfg(pools["emb"], out, "ratio=0.25"))
    with pytest.raises(ConfigError, match=r"ratio=0\.25 \(now 0\.5\).*overwrite=true"):
        stage.main(select_cfg(pools["emb"], out, "ratio=0.5"))
    assert read_selection(out)[1]["kept"] == 4  # untouched
    stage.main(select_cfg(pools["emb"], out, "ratio=0.5", "overwrite=true"))
    assert read_selection(out)[1]["kept"] == 8


def test_damaged_selection_is_redone_not_skipped(pools, tmp_path, caplog):
    out = tmp_path / "sel"
    stage.main(select_cfg(pools["emb"], out, "ratio=0.25"))
    table = (out / "selection.parquet").read_bytes()
    (out / "selection.parquet").write_bytes(table[:-10])
    with caplog.at_level(logging.WARNING, logger="dataeff"):
        stage.main(select_cfg(pools["emb"], out, "ratio=0.25"))
    assert "redoing" in caplog.text and (out / "selection.parquet").read_bytes() == table


def test_a_selection_from_another_pool_with_the_same_paths_is_refused(pools, tmp_path):
    with pytest.raises(ConfigError, match=r"embeddings=.* another pool than data\.shards="):
        stage.main(select_cfg(pools["emb"], tmp_path / "sel_b", f"data.shards={pools['b']}"))
    assert not (tmp_path / "sel_b").exists()
    sel = tmp_path / "sel_a"
    stage.main(select_cfg(pools["emb"], sel, "ratio=0.5"))
    with pytest.raises(ConfigError, match=r"data\.selection=.* another pool than data\.shards="):
        pretrain.main(pretrain_cfg(pools["b"], tmp_path / "run", f"data.selection={sel}"))
    assert not (tmp_path / "run").exists()


def test_pretrain_resumed_or_rerun_with_other_inputs_or_settings_is_refused(pools, tmp_path):
    keys = _ok_keys(pools["a"])
    sel_a = write_selection(tmp_path / "sel_a", keys, set(keys[:8]))
    sel_b = write_selection(tmp_path / "sel_b", keys, set(keys[8:]))
    out = tmp_path / "run"
    pretrain.main(pretrain_cfg(pools["a"], out, f"data.selection={sel_a}"))
    # A finished run: neither skipped nor resumed with another budget.
    with pytest.raises(ConfigError, match=r"trainer\.max_steps=2 \(now 3\).*overwrite=true"):
        pretrain.main(pretrain_cfg(pools["a"], out, f"data.selection={sel_a}", "trainer.max_steps=3"))
    # An interrupted run (checkpoints, no summary) is not resumed on another selection.
    (out / "summary.json").unlink()
    with pytest.raises(ConfigError, match=r"another data\.selection .*overwrite=true"):
        pretrain.main(pretrain_cfg(pools["a"], out, f"data.selection={sel_b}"))
    # Nor is another run started from one of its checkpoints by path.
    ckpt = sorted((out / "checkpoints").glob("*.ckpt"))[0]
    with pytest.raises(ConfigError, match=r"resume=.* run made with other inputs or settings: another data\.selection"):
        pretrain.main(pretrain_cfg(pools["a"], tmp_path / "other", f"data.selection={sel_b}", f"resume={ckpt}"))
    assert not (tmp_path / "other").exists()
    summary = pretrain.main(pretrain_cfg(pools["a"], out, f"data.selection={sel_b}", "overwrite=true"))
    assert summary["resumed_from"] is None and summary["steps"] == 2


def _same_size_edit(path: Path) -> None:
    """Other bytes at the same length, with the modification time put back."""
    st = path.stat()
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_raw_file_changed_without_changing_size_is_resharded(tmp_path):
    raw = make_raw_tree(tmp_path / "raw", n=10, size=40)
    out = tmp_path / "shards" / "x"
    shard_tree(raw, out)
    victim = sorted(raw.rglob("*.jpg"))[3]
    rel = victim.relative_to(raw).as_posix()
    _same_size_edit(victim)
    with pytest.raises(ConfigError, match=f"src file {rel} changed.*overwrite=true"):
        shard_tree(raw, out)
    shard_tree(raw, out, overwrite=True)
    index = pd.read_parquet(out / "index.parquet").set_index("source")
    from dataeff.files import file_sha256

    assert index.loc[rel, "sha256"] == file_sha256(victim)


def test_raw_file_changed_before_a_resume_is_refused(tmp_path):
    raw = make_raw_tree(tmp_path / "raw", n=10, size=40)
    out = tmp_path / "shards" / "x"
    shard_tree(raw, out, samples_per_shard=4)
    # As after a kill: journals of the finished shards, no summary or index yet.
    summary = json.loads((out / "summary.json").read_text())
    index = pd.read_parquet(out / "index.parquet")
    from dataeff.data.shard import journal_rows

    parts = out / ".parts"
    parts.mkdir()
    (parts / "plan.json").write_text(json.dumps({"format": summary["format"], "signature": summary["signature"]}))
    first = summary["shards"][0]
    rows = index.iloc[: index.index[index["shard"] == first["file"]].max() + 1].to_dict("records")
    journal = {"shard": first, "rows": journal_rows(rows), "next": len(rows), "skip": 0}
    (parts / (first["file"] + ".json")).write_text(json.dumps(journal, default=str))
    (out / "summary.json").unlink()
    victim = raw / rows[0]["source"]
    _same_size_edit(victim)
    with pytest.raises(ConfigError, match=f"src file {rows[0]['source']} changed"):
        shard_tree(raw, out, samples_per_shard=4)


@pytest.mark.parametrize("damage", ["truncated", "same_size"])
def test_damaged_tar_is_redone_not_skipped(tmp_path, caplog, damage):
    raw = make_raw_tree(tmp_path / "raw", n=10, size=40)
    out = tmp_path / "shards" / "x"
    shard_tree(raw, out, samples_per_shard=4)
    tar = out / "x-000001.tar"
    original = tar.read_bytes()
    if damage == "truncated":
        tar.write_bytes(original[: len(original) // 2])
    else:
        _same_size_edit(tar)
    with caplog.at_level(logging.INFO, logger="dataeff"):
        shard_tree(raw, out, samples_per_shard=4)
    assert "differs from its recorded size or sha256" in caplog.text and "already complete" not in caplog.text
    assert tar.read_bytes() == original
