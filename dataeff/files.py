"""Atomic file writes: a reader (or a resumed job) sees the old file or the new one, never half of one."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable


def write_atomic(path: str | os.PathLike, write: Callable[[Path], Any]) -> None:
    """Call ``write(tmp)`` on ``<path>.tmp`` in the same folder, then rename it to ``path``.

    The folder is created if needed. ``write`` must not rely on the file suffix (the temp
    name ends in ``.tmp``).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def write_json_atomic(path: str | os.PathLike, obj: Any, **dumps: Any) -> None:
    """:func:`write_atomic` of ``json.dumps(obj, **dumps)``."""
    text = json.dumps(obj, **dumps)
    write_atomic(path, lambda tmp: tmp.write_text(text))
