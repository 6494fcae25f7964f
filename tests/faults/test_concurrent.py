"""Concurrent writers of one output directory: the second exits 2 naming the first; stale locks are taken over.

Each writer is a real ``dataeff shard`` process. The first is slowed down (a sleep per
file, patched in before the CLI runs), so it still holds the lock when the second starts.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dataeff.config import ConfigError
from dataeff.constants import LOCK_NAME
from dataeff.lock import hold
from tests.fixtures import make_raw_tree, shard_tree

#: A ``dataeff shard`` that, before each file, waits until the file ``argv[1]`` exists
#: (one worker, in-process), so the test decides how long it holds the lock.
_GATED_SHARD = """
import os, sys, time
import dataeff.data.shard as shard
real = shard.inspect_source
def gated(*args, **kwargs):
    while not os.path.exists(sys.argv[1]):
        time.sleep(0.02)
    return real(*args, **kwargs)
shard.inspect_source = gated
from dataeff.cli import main
raise SystemExit(main(sys.argv[2:]))
"""


def _args(raw: Path, out: Path, *extra: str) -> list[str]:
    return ["shard", f"src={raw}", f"out={out}", "workers=1", "progress=false", "min_side=16", "samples_per_shard=4", *extra]  # fmt: skip


def _start_gated(raw: Path, out: Path, gate: Path, *extra: str) -> subprocess.Popen:
    cmd = [sys.executable, "-c", _GATED_SHARD, str(gate), *_args(raw, out, *extra)]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _run(raw: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "dataeff", *_args(raw, out, *extra)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def _wait_for_holder(out: Path, pid: int, timeout: float = 60.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            record = json.loads((out / LOCK_NAME).read_text())
        except (OSError, ValueError):
            record = {}
        if record.get("pid") == pid:
            return record
        time.sleep(0.05)
    raise AssertionError(f"pid {pid} never took the lock of {out}")


@pytest.fixture
def raw(tmp_path: Path) -> Path:
    return make_raw_tree(tmp_path / "raw", n=8, size=40)


@pytest.mark.parametrize("second", [("max_side=24",), ()], ids=["other-settings", "identical"])
def test_second_writer_exits_2_naming_the_holder(raw, tmp_path, second, caplog):
    out, gate = tmp_path / "shards" / "x", tmp_path / "go"
    first = _start_gated(raw, out, gate)
    try:
        record = _wait_for_holder(out, first.pid)
        assert record["host"] == socket.gethostname() and record["stage"] == "shard"
        other = _run(raw, out, *second)
        assert other.returncode == 2, other.stderr
        line = other.stderr.strip().splitlines()[-1]
        assert f"pid {first.pid} on host {socket.gethostname()}" in line and "delete" in line
        gate.touch()
        assert first.wait(timeout=120) == 0, first.stderr
    finally:
        first.kill()
        first.wait()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["num_samples"] == 8 and summary["config"]["max_side"] == 0
    assert not (out / LOCK_NAME).exists()  # released
    with caplog.at_level("INFO", logger="dataeff"):  # the finished output is intact: skipped
        shard_tree(raw, out, samples_per_shard=4)
    assert "already complete" in caplog.text


def test_lock_of_a_killed_writer_is_taken_over_and_the_run_completes(raw, tmp_path, caplog):
    reference = tmp_path / "reference"
    shard_tree(raw, reference, samples_per_shard=4)
    out, gate = tmp_path / "shards" / "reference", tmp_path / "go"  # same name: same tar names
    first = _start_gated(raw, out, gate)
    _wait_for_holder(out, first.pid)
    gate.touch()
    deadline = time.monotonic() + 60
    while not (out / ".parts" / "reference-000000.tar.json").is_file():  # past the first tar
        assert time.monotonic() < deadline and first.poll() is None
        time.sleep(0.01)
    os.kill(first.pid, signal.SIGKILL)
    first.wait()
    assert json.loads((out / LOCK_NAME).read_text())["pid"] == first.pid  # left behind
    with caplog.at_level("INFO", logger="dataeff"):
        shard_tree(raw, out, samples_per_shard=4)
    assert f"taking over {out / LOCK_NAME} left by pid {first.pid}" in caplog.text
    assert "finished shards" in caplog.text  # resumed, not redone
    for tar in sorted(reference.glob("*.tar")):
        assert (out / tar.name).read_bytes() == tar.read_bytes(), tar.name
    assert not (out / LOCK_NAME).exists()


def test_a_live_holder_in_this_process_tree_blocks_and_its_release_frees(tmp_path):
    out = tmp_path / "o"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom dataeff.lock import hold\nwith hold(sys.argv[1], 'test'):\n"
         "    print('held', flush=True); time.sleep(60)", str(out)],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        with pytest.raises(ConfigError, match=f"pid {holder.pid} on host"), hold(out, "shard"):
            pass
    finally:
        holder.kill()
        holder.wait()
    with hold(out, "shard"):  # the kernel freed the dead holder's lock
        assert json.loads((out / LOCK_NAME).read_text())["pid"] == os.getpid()


def test_filesystem_without_locks_falls_back_to_the_pid_record(tmp_path, monkeypatch, caplog):
    import fcntl

    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "lockf", no_locks)
    out = tmp_path / "o"
    out.mkdir()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        record = {"host": socket.gethostname(), "pid": sleeper.pid, "stage": "embed", "started": "t"}
        (out / LOCK_NAME).write_text(json.dumps(record))
        with pytest.raises(ConfigError, match=f"pid {sleeper.pid}"), hold(out, "shard"):
            pass
    finally:
        sleeper.kill()
        sleeper.wait()
    with caplog.at_level("INFO", logger="dataeff"), hold(out, "shard"):  # now a dead pid: stale
        assert json.loads((out / LOCK_NAME).read_text())["pid"] == os.getpid()
    assert f"left by pid {sleeper.pid}" in caplog.text and not (out / LOCK_NAME).exists()


def test_input_error_leaves_no_output_directory(tmp_path):
    with pytest.raises(ConfigError, match="src"), hold(tmp_path / "a" / "b", "shard"):
        raise ConfigError("src=x: no such directory")
    assert not (tmp_path / "a").exists()
