"""Run a function on N real gloo ranks (spawned processes) and collect the results."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, fn: Callable, args: tuple, results: Any) -> None:
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    from dataeff import dist

    dist.init(timeout_s=120)
    try:
        results[rank] = fn(rank, world, *args)
    finally:
        dist.destroy()


def run_ranks(fn: Callable, world: int = 2, args: tuple = ()) -> list[Any]:
    """``[fn(rank, world, *args) for rank]`` computed on ``world`` processes in one gloo group.

    ``fn`` must be a module-level function (it is pickled into the children).
    """
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_worker, args=(world, free_port(), fn, args, results), nprocs=world, join=True)
        return [results[r] for r in range(world)]


ROOT = Path(__file__).resolve().parents[1]


def start_parked_pair(
    args: list[str], parked_rank: str, marker: Path, timeout_s: int, **env_extra: str
) -> tuple[subprocess.Popen, subprocess.Popen]:
    """``dataeff <args>`` as rank 0 and the script ``parked_rank`` (same args) as rank 1 of a 2-rank gloo job.

    Plain processes with the torchrun variables set by hand: torchrun itself would kill the
    survivor and hide what it does. Rank 1 writes ``marker`` when it reaches the failure point.
    """
    port = str(free_port())
    procs = []
    for rank in (0, 1):
        env = dict(
            os.environ,
            RANK=str(rank),
            WORLD_SIZE="2",
            LOCAL_RANK=str(rank),
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=port,
            DATAEFF_DIST_TIMEOUT=str(timeout_s),
            PARKED_MARKER=str(marker),
            OMP_NUM_THREADS="1",
            **env_extra,
        )
        cmd = [sys.executable, "-m", "dataeff", *args] if rank == 0 else [sys.executable, "-c", parked_rank, *args]
        procs.append(
            subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        )
    return procs[0], procs[1]


def wait_parked(rank0: subprocess.Popen, rank1: subprocess.Popen, marker: Path, limit_s: float, where: str) -> None:
    """Wait until rank 1 wrote ``marker`` (it reached ``where``); fail if a rank ended first."""
    deadline = time.monotonic() + limit_s
    while not marker.exists():
        if rank0.poll() is not None or rank1.poll() is not None:
            raise AssertionError(
                f"a rank ended before the failure point:\n{rank0.communicate()[1]}\n{rank1.communicate()[1]}"
            )
        assert time.monotonic() < deadline, f"rank 1 never reached {where}"
        time.sleep(0.1)
