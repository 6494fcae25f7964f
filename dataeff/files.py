"""Atomic file writes: a reader (or a resumed job) sees the old file or the new one, never half of one."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import secrets
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dataeff.config import to_yaml
from dataeff.constants import CONFIG_NAME


def fsync_dir(directory: Path) -> None:
    # The rename is durable only once the directory entry is on disk.
    with contextlib.suppress(OSError):  # some filesystems refuse to open a directory
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def temp_name(path: Path, keep_suffix: bool = False) -> Path:
    """A unique hidden name beside ``path``: ``.<name>.<host>-<pid>-<random>.tmp`` (``.tmp<suffix>`` with ``keep_suffix``).

    The host and pid let :func:`remove_stale_temps` tell a dead writer's leftovers from a live one's.
    """
    suffix = ".tmp" + (path.suffix if keep_suffix else "")
    return path.with_name(f".{path.name}.{_host()}-{os.getpid()}-{secrets.token_hex(4)}{suffix}")


def fsync_file(path: Path) -> None:
    """Flush a written file's data to disk (before a rename publishes it)."""
    with open(path, "rb+") as fh:
        os.fsync(fh.fileno())


def _host() -> str:
    return socket.gethostname().partition(".")[0] or "localhost"


#: A :func:`write_atomic` temp name: ``.<name>.<host>-<pid>-<random>.tmp[<suffix>]``.
_TEMP_NAME = re.compile(r"^\..+\.(?P<host>[^.]+)-(?P<pid>\d+)-[0-9a-f]{8}\.tmp(\.\w+)?$")


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, someone else's
        return True
    return True


def remove_stale_temps(directory: str | os.PathLike) -> None:
    """Remove the :func:`write_atomic` temp files in ``directory`` (not below) whose writer is gone.

    A process killed between writing a temp file and renaming it leaves the file behind;
    only temps of this host whose process no longer runs are removed, so a writer on
    another node of a shared filesystem never loses its temp file.
    """
    directory = Path(directory)
    if not directory.is_dir():
        return
    host = _host()
    for path in directory.iterdir():
        match = _TEMP_NAME.match(path.name)
        if match and match["host"] == host and not _running(int(match["pid"])):
            path.unlink(missing_ok=True)


def write_atomic(path: str | os.PathLike, write: Callable[[Path], Any], keep_suffix: bool = False) -> None:
    """Call ``write(tmp)`` on a unique temp file beside ``path``, fsync it, then rename it to ``path``.

    The temp name is ``.<name>.<host>-<pid>-<random>.tmp`` in the same folder: a rename within
    one filesystem is atomic, two writers of one path never share a temp file, and
    :func:`remove_stale_temps` can tell the temp files of killed writers. With
    ``keep_suffix`` it ends in ``.tmp<suffix>`` instead, for writers that pick the format
    from the name (numpy's ``.npz``, matplotlib's ``.png``). The folder is created if
    needed; the temp file is removed if ``write`` fails.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Created by ``write`` itself, so the file gets the usual umask permissions.
    tmp = temp_name(path, keep_suffix)
    try:
        write(tmp)
        fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def save_resolved(cfg: Any, out_dir: str | os.PathLike, name: str = CONFIG_NAME) -> Path:
    """Write the resolved config beside a stage's output (atomically) and return its path.

    Values that came from the environment (``${oc.env:...}``) are written as the expression,
    never resolved (:func:`dataeff.config.redact_env`): an API key stays out of the file.
    Every stage calls this before its first output, so it also clears the temp files a
    killed earlier run left in ``out_dir`` (:func:`remove_stale_temps`).
    """
    remove_stale_temps(out_dir)
    path = Path(out_dir) / name
    text = to_yaml(cfg)
    write_atomic(path, lambda tmp: tmp.write_text(text))
    return path


def read_json(path: str | os.PathLike) -> Any:
    """The JSON document at ``path``; None when there is no such file (a stage not run yet)."""
    path = Path(path)
    return json.loads(path.read_text()) if path.is_file() else None


def write_json_atomic(path: str | os.PathLike, obj: Any, **dumps: Any) -> None:
    """:func:`write_atomic` of ``json.dumps(obj, **dumps)``."""
    text = json.dumps(obj, **dumps)
    write_atomic(path, lambda tmp: tmp.write_text(text))
