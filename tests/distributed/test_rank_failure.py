"""A rank that dies or stalls mid-select makes the survivor fail fast and clearly, not hang.

Two ``dataeff select`` ranks are started as plain processes with the torchrun variables
set by hand (torchrun itself would kill the survivor and hide what it does). Rank 1
stops at a well-defined point: as it is about to receive the k-means centroids
(``dist.broadcast_array``), after the embeddings have been gathered. There it writes a
marker file and waits; the test then SIGKILLs it (a crashed node) or leaves it
stalled (a hung GPU). Rank 0 must exit with code 3 and a message naming the failed
collective: at once for a dead peer, after ``DATAEFF_DIST_TIMEOUT`` for a stalled one.
"""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.fixtures import make_embedded_pool
from tests.multiproc import start_parked_pair, wait_parked

TIMEOUT_S = 10  # DATAEFF_DIST_TIMEOUT of the ranks
START_LIMIT_S = 240  # process start-up on a loaded CI machine (imports torch, timm, faiss)

# Rank 1: run the real CLI, but park in the centroid broadcast.
PARKED_RANK = """
import os, sys, time
from pathlib import Path
from dataeff import cli, dist

def parked(*args, **kwargs):
    Path(os.environ["PARKED_MARKER"]).write_text(str(os.getpid()))
    time.sleep(3600)

dist.broadcast_array = parked
sys.exit(cli.main(sys.argv[1:]))
"""


@pytest.fixture(scope="module")
def embedded(tmp_path_factory) -> dict[str, Path]:
    return make_embedded_pool(tmp_path_factory.mktemp("rank-failure"))


def _start_pair(embedded: dict[str, Path], name: str) -> tuple[subprocess.Popen, subprocess.Popen, Path]:
    out = embedded["tmp"] / name
    marker = embedded["tmp"] / f"{name}.parked"
    args = [
        "select",
        "--config",
        "configs/select/tiny.yaml",
        f"embeddings={embedded['embeddings']}",
        f"data.shards={embedded['shards']}",
        f"out={out}",
    ]
    rank0, rank1 = start_parked_pair(args, PARKED_RANK, marker, TIMEOUT_S, WANDB_MODE="offline")
    return rank0, rank1, marker


def _wait_parked(rank0: subprocess.Popen, rank1: subprocess.Popen, marker: Path) -> None:
    wait_parked(rank0, rank1, marker, START_LIMIT_S, "the centroid broadcast")


def test_killed_rank_makes_survivor_exit_with_message(embedded):
    rank0, rank1, marker = _start_pair(embedded, "killed")
    try:
        _wait_parked(rank0, rank1, marker)
        rank1.send_signal(signal.SIGKILL)
        killed_at = time.monotonic()
        _, err = rank0.communicate(timeout=TIMEOUT_S + 60)
        elapsed = time.monotonic() - killed_at
    finally:
        rank0.kill()
        rank1.kill()
    assert rank1.wait() == -signal.SIGKILL
    assert rank0.returncode == 3, err[-3000:]
    assert "rank 0/2: collective '" in err and "another rank probably died" in err, err[-3000:]
    assert "Traceback" not in err  # a message, not a stack dump
    # gloo sees the closed connection; the timeout is only the upper bound.
    assert elapsed < TIMEOUT_S + 30, f"survivor took {elapsed:.1f}s to fail"
    assert not (embedded["tmp"] / "killed" / "selection.parquet").exists(), "a failed run left a manifest"


def test_stalled_rank_makes_survivor_time_out(embedded):
    rank0, rank1, marker = _start_pair(embedded, "stalled")
    try:
        _wait_parked(rank0, rank1, marker)
        parked_at = time.monotonic()
        _, err = rank0.communicate(timeout=TIMEOUT_S + 60)
        elapsed = time.monotonic() - parked_at
    finally:
        rank0.kill()
        rank1.kill()
    assert rank0.returncode == 3, err[-3000:]
    assert "collective '" in err and "stalled past the timeout" in err, err[-3000:]
    # Not before the timeout (it waited for the peer), not long after it (it did not hang).
    assert TIMEOUT_S - 2 < elapsed < TIMEOUT_S + 30, f"survivor failed after {elapsed:.1f}s"
