"""Run a function on N real gloo ranks (spawned processes) and collect the results."""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
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
