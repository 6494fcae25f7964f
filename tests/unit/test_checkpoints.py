"""Checkpoint files: written whole or not at all, recorded, checked, and skipped when damaged."""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import pytest
import torch

from dataeff.checkpoints import (
    AtomicCheckpointIO,
    checkpoint_problem,
    digest_path,
    find_resume_checkpoint,
    publish_folder,
)


def _save(path: Path, step: int, age_s: float = 0.0) -> Path:
    AtomicCheckpointIO().save_checkpoint({"global_step": step, "w": torch.arange(1000.0)}, path)
    stamp = time.time() - age_s
    os.utime(path, (stamp, stamp))
    return path


def test_save_leaves_the_checkpoint_and_its_record_only(tmp_path):
    path = _save(tmp_path / "checkpoints" / "step=00000004.ckpt", 4)
    assert sorted(p.name for p in path.parent.iterdir()) == ["step=00000004.ckpt", "step=00000004.ckpt.digest.json"]
    record = json.loads(digest_path(path).read_text())
    assert record["files"]["."]["size"] == path.stat().st_size
    assert checkpoint_problem(path) is None
    assert torch.load(path, weights_only=True)["global_step"] == 4


def test_the_same_state_gives_the_same_archive_whatever_the_temp_name(tmp_path):
    """The unique temp name (host, pid, random) must not reach the bytes: a re-run's checkpoint equals the first."""
    import zipfile

    names = [zipfile.ZipFile(_save(tmp_path / d / "last.ckpt", 4)).namelist() for d in ("a", "b")]
    assert names[0] == names[1] and all(n.startswith("archive/") for n in names[0])


def test_a_save_killed_midway_leaves_the_old_checkpoint(tmp_path, monkeypatch):
    path = _save(tmp_path / "step=00000004.ckpt", 4)
    before = path.read_bytes()

    def dies_midway(obj, target):
        target.write(b"PK\x03\x04 half a checkpoint")  # the open temp file
        raise KeyboardInterrupt  # stands for the kill: nothing after this line runs

    monkeypatch.setattr(torch, "save", dies_midway)
    with pytest.raises(KeyboardInterrupt):
        AtomicCheckpointIO().save_checkpoint({"global_step": 8}, path)
    assert path.read_bytes() == before and checkpoint_problem(path) is None
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_remove_drops_the_record_too(tmp_path):
    path = _save(tmp_path / "step=00000004.ckpt", 4)
    AtomicCheckpointIO().remove_checkpoint(path)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("damage", ["truncate", "flip", "drop_record_and_truncate"])
def test_damaged_newest_checkpoint_falls_back_to_the_previous(tmp_path, caplog, damage):
    ckpts = tmp_path / "checkpoints"
    older = _save(ckpts / "step=00000004.ckpt", 4, age_s=20)
    newest = _save(ckpts / "step=00000008.ckpt", 8, age_s=10)
    (ckpts / "last.ckpt").symlink_to(newest.name)
    data = newest.read_bytes()
    if damage == "flip":
        newest.write_bytes(data[:100] + bytes([data[100] ^ 1]) + data[101:])
    else:
        newest.write_bytes(data[: len(data) // 2])
    if damage == "drop_record_and_truncate":  # a checkpoint from before records existed
        digest_path(newest).unlink()
    with caplog.at_level(logging.WARNING, logger="dataeff"):
        assert find_resume_checkpoint(tmp_path) == older
    assert f"skipping checkpoint {newest}" in caplog.text
    reason = {"truncate": "bytes,", "flip": "sha256", "drop_record_and_truncate": "does not load"}[damage]
    assert reason in caplog.text
    newest.unlink()
    older.write_bytes(b"")
    with caplog.at_level(logging.WARNING, logger="dataeff"):
        assert find_resume_checkpoint(tmp_path) is None
    assert "starting from step 0" in caplog.text


def test_partial_saves_are_removed_at_the_resume_decision(tmp_path):
    ckpts = tmp_path / "checkpoints"
    good = _save(ckpts / "step=00000004.ckpt", 4)
    (ckpts / ".step=00000008.ckpt.77-abcd.tmp").write_bytes(b"half")
    (ckpts / ".step=00000008.ckpt.78-beef.tmp").mkdir()  # a DeepSpeed folder cut short
    assert find_resume_checkpoint(tmp_path) == good
    assert sorted(p.name for p in ckpts.iterdir()) == ["step=00000004.ckpt", "step=00000004.ckpt.digest.json"]


def test_checkpoint_folders_are_published_whole(tmp_path):
    """DeepSpeed writes a folder of shards; it is digested and renamed into place like a file."""
    final = tmp_path / "checkpoints" / "step=00000004.ckpt"
    for attempt in (1, 2):  # the second replaces the first (a re-save of the same step)
        tmp = final.with_name(f".{final.name}.1-{attempt}.tmp")
        (tmp / "checkpoint").mkdir(parents=True)
        (tmp / "latest").write_text("checkpoint")
        (tmp / "checkpoint" / "mp_rank_00_model_states.pt").write_bytes(bytes([attempt]) * 64)
        publish_folder(tmp, final)
        assert not tmp.exists() and checkpoint_problem(final) is None
    assert (final / "checkpoint" / "mp_rank_00_model_states.pt").read_bytes() == bytes([2]) * 64
    assert sorted(p.name for p in final.parent.iterdir()) == [final.name, final.name + ".digest.json"]
    (final / "checkpoint" / "mp_rank_00_model_states.pt").write_bytes(b"")
    assert "mp_rank_00_model_states.pt has 0 bytes" in checkpoint_problem(final)
    (final / "checkpoint" / "mp_rank_00_model_states.pt").unlink()
    assert "is missing" in checkpoint_problem(final)
