"""The one module that touches ``torch.distributed``.

Reads the rank layout from torchrun's or SLURM's environment, sets up the process
group (NCCL on GPU, gloo on CPU) with a timeout, and offers collectives on numpy
arrays and picklable objects. Every helper has a single-process default (rank 0 of
1 when no group is initialised), so stage code never branches on "am I distributed".
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import re
import traceback
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import torch
import torch.distributed as torch_dist

from dataeff.config import first_line

T = TypeVar("T")
log = logging.getLogger("dataeff")

DEFAULT_TIMEOUT_S = 600
_DEFAULT_PORT = 29500


class DistributedError(RuntimeError):
    """A collective failed: most often another rank died or timed out."""


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits in the job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int = _DEFAULT_PORT
    launcher: str = "none"  # "torchrun", "slurm" or "none"


def expand_nodelist(nodelist: str) -> list[str]:
    """Expand a SLURM node list such as ``gpu[01-03,07],cpu5`` into host names."""
    hosts: list[str] = []
    for match in re.finditer(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist):
        prefix, ranges = match.group(1), match.group(2)
        if not ranges:
            hosts.append(prefix)
            continue
        for part in ranges.split(","):
            lo, _, hi = part.partition("-")
            if not hi:
                hosts.append(prefix + lo)
                continue
            for i in range(int(lo), int(hi) + 1):
                hosts.append(prefix + str(i).zfill(len(lo)))
    return hosts


def env_from(environ: Mapping[str, str]) -> DistEnv:
    """Read the rank layout from torchrun's variables, else SLURM's, else single process."""
    if "RANK" in environ and "WORLD_SIZE" in environ:
        return DistEnv(
            rank=int(environ["RANK"]),
            world_size=int(environ["WORLD_SIZE"]),
            local_rank=int(environ.get("LOCAL_RANK", 0)),
            master_addr=environ.get("MASTER_ADDR", "127.0.0.1"),
            master_port=int(environ.get("MASTER_PORT", _DEFAULT_PORT)),
            launcher="torchrun",
        )
    if "SLURM_PROCID" in environ and int(environ.get("SLURM_NTASKS", "1")) > 1:
        nodelist = environ.get("SLURM_STEP_NODELIST") or environ.get("SLURM_NODELIST") or "127.0.0.1"
        # A port derived from the job id keeps concurrent jobs on a node from colliding.
        job = int(environ.get("SLURM_JOB_ID", "0"))
        return DistEnv(
            rank=int(environ["SLURM_PROCID"]),
            world_size=int(environ["SLURM_NTASKS"]),
            local_rank=int(environ.get("SLURM_LOCALID", 0)),
            master_addr=environ.get("MASTER_ADDR") or expand_nodelist(nodelist)[0],
            master_port=int(environ.get("MASTER_PORT", _DEFAULT_PORT + job % 10000)),
            launcher="slurm",
        )
    return DistEnv()


def init(timeout_s: float | None = None, backend: str | None = None) -> DistEnv:
    """Join the process group described by the environment (no-op for a single process).

    Also exports RANK/WORLD_SIZE/LOCAL_RANK/MASTER_* so Lightning, launched under SLURM
    ``srun``, sees the same layout. ``DATAEFF_DIST_TIMEOUT`` (seconds) overrides the
    default collective timeout.
    """
    env = env_from(os.environ)
    if env.world_size <= 1 or torch_dist.is_initialized():
        return env
    for key, value in (
        ("RANK", env.rank),
        ("WORLD_SIZE", env.world_size),
        ("LOCAL_RANK", env.local_rank),
        ("MASTER_ADDR", env.master_addr),
        ("MASTER_PORT", env.master_port),
    ):
        os.environ[key] = str(value)
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(env.local_rank)
    timeout = timeout_s if timeout_s is not None else float(os.environ.get("DATAEFF_DIST_TIMEOUT", DEFAULT_TIMEOUT_S))
    torch_dist.init_process_group(
        backend=backend,
        init_method=f"tcp://{env.master_addr}:{env.master_port}",
        rank=env.rank,
        world_size=env.world_size,
        timeout=datetime.timedelta(seconds=timeout),
    )
    log.debug("rank %d/%d joined (%s, %s)", env.rank, env.world_size, backend, env.launcher)
    return env


def destroy() -> None:
    if torch_dist.is_initialized():
        torch_dist.destroy_process_group()


def is_initialized() -> bool:
    return torch_dist.is_available() and torch_dist.is_initialized()


def rank() -> int:
    return torch_dist.get_rank() if is_initialized() else 0


def world_size() -> int:
    return torch_dist.get_world_size() if is_initialized() else 1


def is_main() -> bool:
    return rank() == 0


def _failure(name: str, exc: BaseException, place: tuple[int, int] | None = None) -> DistributedError:
    rank_, world = place or (rank(), world_size())
    return DistributedError(
        f"rank {rank_}/{world}: collective '{name}' failed — another rank probably "
        f"died or stalled past the timeout ({exc.__class__.__name__}: {first_line(exc)})"
    )


def _guarded(name: str, fn: Callable[[], T]) -> T:
    try:
        return fn()
    except RuntimeError as exc:  # gloo/NCCL report a dead peer or a timeout as RuntimeError
        raise _failure(name, exc) from exc


def collective_name(exc: BaseException) -> str | None:
    """Which collective ``exc`` came out of, from its traceback; None when it came from none.

    DDP's own collectives run inside the forward (``buffer broadcast``, module buffers
    sent from rank 0) and the backward (``gradient all-reduce``, from C++ hooks, so only
    the autograd frame shows); any other is named by its ``torch.distributed`` function.
    """
    frames = traceback.extract_tb(exc.__traceback__)
    names = {frame.name for frame in frames}
    if "_sync_buffers" in names:
        return "buffer broadcast (DDP forward)"
    for frame in reversed(frames):
        path = frame.filename.replace(os.sep, "/")
        if "/torch/distributed/" in path:
            return frame.name
        if "/torch/autograd/" in path:
            return "gradient all-reduce (DDP backward)"
    if isinstance(exc, getattr(torch_dist, "DistBackendError", ())) or "gloo" in str(exc) or "NCCL" in str(exc):
        return "a collective"
    return None


@contextlib.contextmanager
def collective_failures() -> Iterator[None]:
    """Raise a collective that fails inside the block (Lightning's, DDP's) as :class:`DistributedError`.

    The message names this rank and the collective (:func:`collective_name`), so a dead or
    hung peer during training exits 3 with one line, like any dataeff collective. Errors
    that did not come from a collective, and single-process runs, pass unchanged.
    """
    # Read now: by the time an error arrives Lightning may have removed the group and WORLD_SIZE.
    env = env_from(os.environ)
    try:
        yield
    except RuntimeError as exc:
        name = collective_name(exc) if env.world_size > 1 else None
        if name is None or isinstance(exc, DistributedError):
            raise
        raise _failure(name, exc, (env.rank, env.world_size)) from exc


def _device() -> torch.device:
    """Where collective buffers live: NCCL only moves CUDA tensors, gloo CPU ones."""
    if torch_dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def barrier() -> None:
    if is_initialized():
        # A barrier as an all-reduce, so it honours the group's timeout on gloo too.
        _guarded("barrier", lambda: torch_dist.all_reduce(torch.zeros(1, device=_device())))


def all_gather_object(obj: T) -> list[T]:
    """Every rank's ``obj``, in rank order."""
    if not is_initialized():
        return [obj]
    out: list[Any] = [None] * world_size()
    _guarded("all_gather_object", lambda: torch_dist.all_gather_object(out, obj))
    return out


def broadcast_object(obj: T, src: int = 0) -> T:
    """``obj`` from rank ``src`` on every rank."""
    if not is_initialized():
        return obj
    box = [obj]
    _guarded("broadcast_object", lambda: torch_dist.broadcast_object_list(box, src=src))
    return box[0]


def all_gather_array(array: np.ndarray) -> list[np.ndarray]:
    """Every rank's array, in rank order; lengths (first axis) may differ per rank.

    Arrays travel as raw bytes through tensors (not pickle), padded to the longest; on CPU
    the returned arrays are views of the receive buffers (no second copy of the pool).
    """
    if not is_initialized():
        return [array]
    array = np.ascontiguousarray(array)
    metas = all_gather_object((array.shape, array.dtype.str))
    sizes = [int(np.prod(shape)) * np.dtype(dt).itemsize for shape, dt in metas]
    buf = torch.zeros(max(max(sizes), 1), dtype=torch.uint8)
    buf[: sizes[rank()]] = torch.from_numpy(array.view(np.uint8).reshape(-1).copy())
    buf = buf.to(_device())
    gathered = [torch.empty_like(buf) for _ in metas]
    _guarded("all_gather", lambda: torch_dist.all_gather(gathered, buf))
    return [
        g[:n].cpu().numpy().view(np.dtype(dt)).reshape(shape)
        for g, n, (shape, dt) in zip(gathered, sizes, metas, strict=False)
    ]


def all_gather_concat(array: np.ndarray) -> np.ndarray:
    """Arrays of every rank joined along the first axis, in rank order."""
    parts = all_gather_array(array)
    return parts[0] if len(parts) == 1 else np.concatenate(parts, axis=0)


def broadcast_array(array: np.ndarray | None, src: int = 0) -> np.ndarray:
    """The array held by rank ``src`` (others may pass None) on every rank."""
    if not is_initialized():
        assert array is not None
        return array
    meta: tuple[tuple[int, ...], str] | None = None if array is None else (array.shape, array.dtype.str)
    shape, dt = broadcast_object(meta, src=src)  # type: ignore[misc]  # rank src sends a tuple
    n = int(np.prod(shape)) * np.dtype(dt).itemsize
    buf = torch.zeros(max(n, 1), dtype=torch.uint8)
    if rank() == src:
        buf[:n] = torch.from_numpy(np.ascontiguousarray(array).view(np.uint8).reshape(-1).copy())
    buf = buf.to(_device())
    _guarded("broadcast", lambda: torch_dist.broadcast(buf, src=src))
    return buf[:n].cpu().numpy().view(np.dtype(dt)).reshape(shape).copy()


def all_to_all_rows(rows: np.ndarray, counts: Sequence[int]) -> np.ndarray:
    """Rows grouped by destination (the first ``counts[0]`` for rank 0, and so on) sent to their rank.

    Returns the rows every rank sent here, in source rank order. One ``all_to_all_single``
    of raw bytes with uneven splits (gloo and NCCL both support it); the counts travel
    first; every rank's rows have the same dtype and row shape. On CPU neither side is
    copied: the sent array is the send buffer, the received one a view of the receive buffer.

    Shape:
        rows: (sum(counts), ...) -> (rows sent here, ...).
    """
    if not is_initialized():
        assert len(counts) == 1, "one process sends to itself only"
        return rows
    assert len(counts) == world_size(), "one count per destination rank"
    rows = np.ascontiguousarray(rows)
    incoming = [c[rank()] for c in all_gather_object([int(c) for c in counts])]  # counts[src][dst]
    row_bytes = rows.dtype.itemsize * int(np.prod(rows.shape[1:]))
    buf = torch.from_numpy(rows.reshape(-1).view(np.uint8)).to(_device())
    recv = torch.empty(sum(incoming) * row_bytes, dtype=torch.uint8, device=_device())
    _guarded(
        "all_to_all",
        lambda: torch_dist.all_to_all_single(
            recv, buf, [c * row_bytes for c in incoming], [int(c) * row_bytes for c in counts]
        ),
    )
    return recv.cpu().numpy().view(rows.dtype).reshape(-1, *rows.shape[1:])


def ranks_per_node(environ: Mapping[str, str] | None = None) -> int:
    """Processes sharing this node's memory: torchrun's or SLURM's count, else the world size."""
    environ = os.environ if environ is None else environ
    per_node = environ.get("LOCAL_WORLD_SIZE") or environ.get("SLURM_NTASKS_PER_NODE", "").split("(")[0]
    return int(per_node) if per_node.isdigit() else world_size()


class _RankZeroFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return is_main() or record.levelno >= logging.WARNING


def setup_logging(level: int = logging.INFO) -> logging.Logger:
    """Configure the ``dataeff`` logger: INFO from rank 0 only, warnings from every rank."""
    if not any(getattr(h, "_dataeff", False) for h in log.handlers):
        handler = logging.StreamHandler()
        handler._dataeff = True  # type: ignore[attr-defined]
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s [%(name)s] %(message)s", "%H:%M:%S"))
        handler.addFilter(_RankZeroFilter())
        log.addHandler(handler)
        log.propagate = False
    log.setLevel(level)
    return log
