"""Provenance records: what is compared, and the phrase naming what differs."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

from dataeff import provenance
from dataeff.lock import busy_message, is_stale


def test_config_values_leave_out_run_only_keys_and_inputs():
    values = {
        "out": "x", "workers": 4, "seed": 1, "data": {"shards": "s", "num_workers": 2, "batch_size": 8},
        "wandb": {"enabled": True, "tags": ["a"]}, "trainer": {"max_steps": 5, "progress_bar": False},
        "report": {"gallery": True},
    }  # fmt: skip
    kept = provenance.config_values(values, ["data.shards", "report."])
    assert kept == {"seed": 1, "data.batch_size": 8, "trainer.max_steps": 5}


def test_difference_names_the_input_first_then_the_key():
    old = provenance.record("pretrain", {"ratio": 0.25, "seed": 0}, {"data.selection": "a" * 64})
    assert provenance.difference(old, old) is None
    new = provenance.record("pretrain", {"ratio": 0.5, "seed": 0}, {"data.selection": "b" * 64})
    assert provenance.difference(old, new) == f"another data.selection ({'a' * 12} recorded, {'b' * 12} now)"
    new = provenance.record("pretrain", {"ratio": 0.5, "seed": 0}, {"data.selection": "a" * 64})
    assert provenance.difference(old, new) == "ratio=0.25 (now 0.5)"
    new = provenance.record("pretrain", {"ratio": 0.25}, {"data.selection": "a" * 64})
    assert provenance.difference(old, new) == "seed=0 (now <unset>)"


def test_path_identity_follows_content_not_names_or_times(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    for root in (a, b):
        (root / "images").mkdir(parents=True)
        (root / "images" / "1.png").write_bytes(b"pixels")
    (a / ".dataeff.lock").write_text("{}")  # hidden files are not content
    assert provenance.path_identity(a) == provenance.path_identity(b)
    (b / "images" / "1.png").write_bytes(b"pixelz")
    assert provenance.path_identity(a) != provenance.path_identity(b)
    assert provenance.path_identity("") == ""


def test_a_dead_pid_on_this_host_is_stale_a_live_or_remote_one_is_not():
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    host = socket.gethostname()
    assert is_stale({"host": host, "pid": int(done.stdout)})
    assert not is_stale({"host": host, "pid": os.getpid()})
    assert not is_stale({"host": host + "-other", "pid": int(done.stdout)})  # cannot check another host
    line = busy_message(Path("/o/.dataeff.lock"), {"host": "n1", "pid": 7, "stage": "embed"})
    assert "pid 7 on host n1 (dataeff embed" in line and "delete /o/.dataeff.lock" in line and "\n" not in line


def test_sweep_unit_of_another_pool_is_refused_or_redone_with_overwrite(tmp_path):
    import pytest

    from dataeff.config import ConfigError
    from dataeff.sweep import check_digest

    record = {"config_digest": "d1", "inputs": {"shards": "a" * 64, "datasets.kvasir": "c" * 64}}
    assert check_digest(record, "d1", tmp_path, dict(record["inputs"]))
    assert check_digest({"config_digest": "d1"}, "d1", tmp_path, {"shards": "b" * 64})  # recorded before inputs
    other = {"shards": "b" * 64, "datasets.kvasir": "c" * 64}
    with pytest.raises(ConfigError, match=r"other inputs: another shards .*overwrite=true"):
        check_digest(record, "d1", tmp_path, other)
    assert not check_digest(record, "d1", tmp_path, other, overwrite=True)
    with pytest.raises(ConfigError, match=r"other settings \(config digest d1 != d2\)"):
        check_digest(record, "d2", tmp_path, dict(record["inputs"]))
