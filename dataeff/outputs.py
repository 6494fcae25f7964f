"""Finished outputs judged by content: recorded sizes and sha256, checked before a stage skips.

A stage that finishes records the size and sha256 of its output files in its summary
(:func:`output_record`); a later run skips it only while they match (:func:`intact`),
so a truncated or replaced file is redone, never trusted for its name. Shard resume
also checks that the raw files already sharded still hold the recorded bytes
(:func:`changed_file`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from dataeff.files import file_sha256

log = logging.getLogger("dataeff")


def output_record(out: str | os.PathLike, names: Iterable[str]) -> dict[str, dict[str, Any]]:
    """Size and sha256 of each named output file: what a later run checks before it skips."""
    return {n: {"bytes": (Path(out) / n).stat().st_size, "sha256": file_sha256(Path(out) / n)} for n in names}


def damaged(out: str | os.PathLike, recorded: Mapping[str, Any] | None) -> str | None:
    """The first recorded output file that is missing or differs from its record, as a phrase; None when intact.

    A record without ``outputs`` (an older dataeff) is taken as intact.
    """
    for name, rec in (recorded or {}).items():
        path = Path(out) / name
        if not path.is_file():
            return f"{path} is missing"
        size = path.stat().st_size
        if size != rec["bytes"]:
            return f"{path} has {size} bytes, {rec['bytes']} recorded"
        if file_sha256(path) != rec["sha256"]:
            return f"{path} differs from its recorded sha256"
    return None


def intact(out: str | os.PathLike, recorded: Mapping[str, Any] | None, stage: str) -> bool:
    """:func:`damaged` as a yes/no, logging what is redone when an output is damaged."""
    what = damaged(out, recorded)
    if what is not None:
        log.warning("%s: %s; redoing the output instead of skipping it", stage, what)
    return what is None


def changed_file(root: str | os.PathLike, rels: Iterable[str], sha256s: Iterable[str]) -> str | None:
    """The first file under ``root`` whose bytes no longer hash to the recorded sha256 ('' = not recorded).

    Content, not size or time: a file rewritten in place with other bytes of the same
    length, and its modification time put back, is still found.
    """
    for rel, recorded in zip(rels, sha256s, strict=True):
        if not recorded:
            continue
        try:
            now = file_sha256(Path(root) / rel)
        except OSError:
            return rel
        if now != recorded:
            return rel
    return None
