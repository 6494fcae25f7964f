"""Compare two output directories of the same run, byte for byte except what records the clock.

Both runs must have written to the same path (move the first one aside before the second
starts): outputs record their own paths and hash their configs. What legitimately
differs between two identical runs is left out, by name: wall-clock
fields (``wall_s``, ``images_per_s``, ``started``, ...), torch's random
``serialization_id`` inside checkpoints and so the sha256 recorded for a checkpoint, and the Markdown report and plots that render those clock figures
(their numbers are compared in ``report.csv``).
"""

from __future__ import annotations

import csv
import io
import json
import zipfile
from pathlib import Path
from typing import Any

#: Keys (JSON) and columns (CSV) that hold wall-clock readings.
CLOCK_FIELDS = frozenset(
    {
        "wall_s",
        "wall_time_s",
        "train_time_s",
        "timings_s",
        "images_per_s",
        "started",
        "finished",
        "pretrain_hours",
    }
)
#: Files that render clock figures; their numbers are compared in the CSV beside them.
RENDERED = (".md", ".png")


def _without_clock(value: Any, archive: bool = False) -> Any:
    """``value`` without clock fields; ``archive``: it describes a checkpoint, whose sha256 is not reproducible."""
    if isinstance(value, dict):
        return {
            k: _without_clock(v, archive or str(k).endswith(".ckpt"))
            for k, v in value.items()
            if k not in CLOCK_FIELDS and not (archive and k == "sha256")
        }
    if isinstance(value, list):
        return [_without_clock(v, archive) for v in value]
    return value


def _csv_rows(data: bytes) -> list[dict[str, str]]:
    return [
        {k: v for k, v in row.items() if k not in CLOCK_FIELDS} for row in csv.DictReader(io.StringIO(data.decode()))
    ]


def _zip_members(data: bytes) -> dict[str, bytes]:
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        return {
            i.filename.split("/", 1)[-1]: z.read(i) for i in z.infolist() if not i.filename.endswith("serialization_id")
        }


def comparable(path: Path) -> Any:
    """The content of ``path`` as compared: clock fields dropped, checkpoint archives by member."""
    data = path.read_bytes()
    if path.suffix == ".ckpt":
        return _zip_members(data)
    if path.suffix == ".json":  # a checkpoint's digest record holds the archive's sha256
        return _without_clock(json.loads(data), archive=path.name.endswith(".ckpt.digest.json"))
    if path.suffix == ".csv":
        return _csv_rows(data)
    return data


def differences(a: Path, b: Path) -> list[str]:
    """Relative paths whose content differs between output roots ``a`` and ``b`` (or that only one has)."""
    files = {
        root: {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and p.suffix not in RENDERED}
        for root in (a, b)
    }
    out = sorted(files[a] ^ files[b])
    for rel in sorted(files[a] & files[b]):
        if comparable(a / rel) != comparable(b / rel):
            out.append(rel)
    return out


def first_difference(a: Path, b: Path, rel: str) -> str:
    """A short description of how ``rel`` differs between roots ``a`` and ``b``, for a failure message."""
    if not (a / rel).is_file() or not (b / rel).is_file():
        return f"{rel}: only in {a if (a / rel).is_file() else b}"
    x, y = comparable(a / rel), comparable(b / rel)
    if isinstance(x, dict) and isinstance(y, dict):
        keys = sorted(k for k in set(x) | set(y) if x.get(k) != y.get(k))
        return f"{rel}: " + "; ".join(f"{k}: {str(x.get(k))[:200]} != {str(y.get(k))[:200]}" for k in keys[:5])
    return f"{rel}: {str(x)[:300]} != {str(y)[:300]}"
