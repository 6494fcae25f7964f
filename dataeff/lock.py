"""One writer per output directory: an exclusive lock file every stage holds while it runs.

``<out>/.dataeff.lock`` is locked with ``fcntl.lockf`` (a POSIX record lock) and holds
its holder as JSON: host, pid, start time, stage and command line. A second writer
fails at once (exit 2) naming the holder. POSIX locks rather than ``flock``: they
belong to the process, so forked workers (shard's decoders, dataloader workers) never
inherit them and a holder's death always frees the lock; and NFS carries them to the
server (``flock`` on NFS is emulated by them anyway). When the holder dies without
releasing (kill -9, a lost node) the kernel (or, on NFS, the server once the client's
lease ends) frees the lock; the next run finds the dead holder's record, says so in a
log line and takes over. On a filesystem without locks (Lustre mounted ``noflock``)
the record alone decides: a live pid on this host, or any holder on another host,
keeps the directory; a dead pid on this host is taken over.

In a multi-rank run only global rank 0 locks; the outcome is broadcast, so every rank
stops together when the directory is taken. The lock file is removed on release, as
are the folders it had to create (an input error leaves nothing behind).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import json
import logging
import os
import socket
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from dataeff.config import ConfigError
from dataeff.constants import LOCK_NAME

log = logging.getLogger("dataeff")

F = TypeVar("F", bound=Callable[..., Any])

#: errno values of a lock call on a filesystem that does not support locks.
_NO_LOCKS = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)
#: Lock files this process holds (resolved path -> depth), so a stage run inside another
#: stage on the same directory (the sweep's report) does not lock itself out.
_HELD: dict[str, int] = {}


def holder_record(stage: str) -> dict[str, Any]:
    """What a lock file says about its holder."""
    return {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "stage": stage,
        "command": " ".join(sys.argv),
    }


def pid_alive(pid: int) -> bool:
    """Whether a process with this id runs on this host (a zombie counts as dead)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    with contextlib.suppress(OSError):
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return fields[0] != "Z"
    return True


def is_stale(holder: dict[str, Any] | None) -> bool:
    """A record of a holder that is known to be gone: a dead pid on this host."""
    if not holder:
        return True
    return holder.get("host") == socket.gethostname() and not pid_alive(int(holder.get("pid", -1)))


def busy_message(path: Path, holder: dict[str, Any] | None) -> str:
    """One line naming the holder of ``path`` and how to clear a stale lock."""
    if not holder:
        who = "another process (its record is not written yet)"
    else:
        who = (
            f"pid {holder.get('pid')} on host {holder.get('host')} "
            f"(dataeff {holder.get('stage')}, started {holder.get('started')})"
        )
    return (
        f"{path.parent} is being written by {who}; wait for it to finish or stop it. If that process "
        f"is gone (e.g. its node died), delete {path} and run again"
    )


def _parse(data: bytes) -> dict[str, Any] | None:
    try:
        record = json.loads(data)
    except ValueError:
        return None
    return record if isinstance(record, dict) else None


def _read(path: Path) -> dict[str, Any] | None:
    """The record of a lock this process does not hold (closing a file drops this process's POSIX locks on it)."""
    try:
        return _parse(path.read_bytes())
    except OSError:
        return None


def _read_fd(fd: int) -> dict[str, Any] | None:
    """The record of the lock held through ``fd``, read through that same descriptor."""
    return _parse(os.pread(fd, 1 << 16, 0))


def _write(fd: int, record: dict[str, Any]) -> None:
    data = json.dumps(record, sort_keys=True).encode()
    os.ftruncate(fd, 0)
    os.pwrite(fd, data, 0)
    os.fsync(fd)


def _take_over_message(path: Path, previous: dict[str, Any]) -> str:
    return (
        f"lock: taking over {path} left by pid {previous.get('pid')} on host {previous.get('host')} "
        f"(started {previous.get('started')}), which is no longer running"
    )


def _acquire(path: Path, stage: str) -> int:
    """Lock ``path`` (created if needed) and write this process's record into it; returns the fd.

    Raises:
        ConfigError: another live process holds it.
    """
    for _ in range(20):
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in _NO_LOCKS:
                return _acquire_unlocked(path, stage)
            if exc.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            holder = _read(path)
            if holder and not is_stale(holder):
                raise ConfigError(busy_message(path, holder)) from None
            time.sleep(0.05)  # the new holder has not written its record yet, or is releasing
            continue
        # The last holder may have removed the file between our open and our lock: then we
        # locked a deleted inode and must start over on the current file.
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(path))
        except FileNotFoundError:
            same = False
        if not same:
            os.close(fd)
            continue
        previous = _read_fd(fd)
        if previous:
            log.info("%s", _take_over_message(path, previous))
        _write(fd, holder_record(stage))
        return fd
    raise ConfigError(busy_message(path, _read(path)))


def _acquire_unlocked(path: Path, stage: str) -> int:
    """The record-only fallback for filesystems without locks (see the module docstring)."""
    holder = _read(path)
    if holder and holder.get("pid") != os.getpid() and not is_stale(holder):
        raise ConfigError(busy_message(path, holder) + " (this filesystem has no locks: the record decides)")
    if holder:
        log.info("%s", _take_over_message(path, holder))
    log.warning("lock: %s does not support file locks; guarding %s by its pid record only", path.parent, path)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    _write(fd, holder_record(stage))
    return fd


def _created_dirs(out: Path) -> list[Path]:
    """The folders ``out.mkdir(parents=True)`` is about to create, deepest first."""
    missing = []
    for folder in (out, *out.parents):
        if folder.exists():
            break
        missing.append(folder)
    return missing


@contextlib.contextmanager
def hold(out: str | os.PathLike, stage: str) -> Iterator[None]:
    """Hold the lock of ``out`` in this process (no collectives); see :func:`output_lock`."""
    out = Path(out)
    created = _created_dirs(out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / LOCK_NAME
    key = os.path.realpath(path)
    if key in _HELD:
        _HELD[key] += 1
        try:
            yield
        finally:
            _HELD[key] -= 1
        return
    try:
        fd = _acquire(path, stage)
    except BaseException:
        _remove_empty(created)
        raise
    _HELD[key] = 1
    try:
        yield
    finally:
        del _HELD[key]
        with contextlib.suppress(OSError):
            if os.path.samestat(os.fstat(fd), os.stat(path)):
                path.unlink()  # before the unlock: a waiter that opened it retries on a fresh file
        os.close(fd)
        _remove_empty(created)


def _remove_empty(created: list[Path]) -> None:
    for folder in created:
        try:
            folder.rmdir()
        except OSError:  # not empty: the stage wrote something
            return


@contextlib.contextmanager
def output_lock(out: str | os.PathLike, stage: str, collective: bool = False) -> Iterator[None]:
    """Hold the exclusive lock of the output directory ``out`` for the ``with`` block.

    Args:
        out: the stage's output directory (created if needed; removed again if it is
            still empty at the end and was created here).
        stage: the stage's name, recorded for whoever finds the lock taken.
        collective: every rank of the process group calls this together; rank 0 locks
            and broadcasts whether it could, so all ranks fail alike.

    Raises:
        ConfigError: another live writer holds ``out`` (exit 2), naming it.
    """
    if collective:
        from dataeff import dist  # torch: only the stages that run on several ranks need it

        dist.init()
    if collective and dist.world_size() > 1:
        error = None
        with contextlib.ExitStack() as stack:
            if dist.is_main():
                try:
                    stack.enter_context(hold(out, stage))
                except ConfigError as exc:
                    error = str(exc)
            error = dist.broadcast_object(error)
            if error:
                raise ConfigError(error)
            yield
        return
    with hold(out, stage):
        yield


def locked(stage: str, collective: bool = False, key: str = "out") -> Callable[[F], F]:
    """Decorate a stage's ``main(cfg, ...)`` to run under :func:`output_lock` of the directory ``cfg.<key>``."""

    def wrap(main: F) -> F:
        @functools.wraps(main)
        def run(cfg: Any, *args: Any, **kwargs: Any) -> Any:
            with output_lock(getattr(cfg, key), stage, collective):
                return main(cfg, *args, **kwargs)

        return run  # type: ignore[return-value]

    return wrap
