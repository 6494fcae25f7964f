"""``dataeff shard`` killed with SIGKILL mid-run, then re-run: output identical to an uninterrupted run."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dataeff.config import load_config
from dataeff.data.shard import ShardConfig, main
from tests.fixtures import REPO, make_raw_tree

N_IMAGES = 200


TINY = str(REPO / "configs/shard/tiny.yaml")


def _overrides(raw: Path, out: Path) -> list[str]:
    # max_side forces a re-encode of every image: slow enough to be caught mid-run
    return [
        f"src={raw}", f"out={out}", "name=pool", "samples_per_shard=4", "workers=2", "chunksize=2",
        "max_side=40", "progress=false",
    ]  # fmt: skip


def _cmd(raw: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "dataeff", "shard", "--config", TINY, *_overrides(raw, out)]


def _run(raw: Path, out: Path) -> subprocess.CompletedProcess:
    proc = subprocess.run(_cmd(raw, out), cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return proc


def _files(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.is_file() and p.name != "config.yaml"}


@pytest.mark.timeout(600)
def test_resume_after_sigkill_gives_identical_output(tmp_path, caplog):
    raw = make_raw_tree(tmp_path / "raw", n=N_IMAGES, size=64, sites=3)
    killed, clean = tmp_path / "killed" / "pool", tmp_path / "clean" / "pool"

    proc = subprocess.Popen(
        _cmd(raw, killed), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True
    )
    journal = killed / ".parts" / "pool-000001.tar.json"  # written once shard 1 is complete
    deadline = time.monotonic() + 240
    try:
        while not journal.exists():
            assert proc.poll() is None, (
                "shard finished or died before it could be killed: " + proc.stderr.read().decode()
            )
            assert time.monotonic() < deadline, "no shard appeared in time"
            time.sleep(0.005)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the whole job, workers included, as a scheduler would
        proc.wait()
    assert not (killed / "summary.json").exists(), "the run must have been killed before it finished"
    done = sorted(p.name for p in killed.glob("pool-*.tar"))
    assert "pool-000000.tar" in done and len(done) < N_IMAGES // 4
    first_stamp = (killed / "pool-000000.tar").stat().st_mtime_ns

    resumed = _run(raw, killed)
    assert "resuming after" in resumed.stderr
    assert (killed / "pool-000000.tar").stat().st_mtime_ns == first_stamp, "finished shards are kept, not redone"
    main(load_config(ShardConfig, TINY, _overrides(raw, clean)))  # uninterrupted, in-process

    a, b = _files(killed), _files(clean)
    assert sorted(a) == sorted(b)
    assert not (killed / ".parts").exists() and not any(n.endswith(".tmp") for n in a)
    summary_a, summary_b = json.loads(a.pop("summary.json")), json.loads(b.pop("summary.json"))
    assert summary_a["config"].pop("out") != summary_b["config"].pop("out")
    assert summary_a == summary_b
    assert summary_a["num_files"] == N_IMAGES and summary_a["num_shards"] == N_IMAGES // 4
    for name in a:
        assert a[name] == b[name], f"{name} differs after resume"

    with caplog.at_level(logging.INFO, logger="dataeff"):
        main(load_config(ShardConfig, TINY, _overrides(raw, killed)))
    assert "already complete" in caplog.text
