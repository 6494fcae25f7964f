"""Sample keys and site names derived from a file's path relative to the source root.

Keys follow docs/architecture.md ("Shard directory"): the relative path with every
character outside ``[A-Za-z0-9_-]`` replaced by ``_``, then ``-`` and the first 8 hex
digits of the sha1 of the relative path. The hash keeps keys unique when two paths
sanitise alike (``a b.jpg`` and ``a_b.jpg``); the sanitising keeps them free of ``/``
and ``.``, which WebDataset would read as a directory or an extension separator.
"""

from __future__ import annotations

import hashlib
import os
import re

_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")

#: Extensions (lower case, with the dot) read as images; anything else is listed as
#: ``unsupported_extension`` in the index so that no input file vanishes.
IMAGE_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")


def path_bytes(rel: str) -> bytes:
    """The raw bytes of a relative path (undecodable file names survive via surrogateescape)."""
    return os.fsencode(rel)


def display_path(rel: str) -> str:
    """``rel`` as valid UTF-8 text for the index; undecodable bytes become U+FFFD."""
    return path_bytes(rel).decode("utf-8", errors="replace")


def make_key(rel: str) -> str:
    """The stable sample key of the file at POSIX relative path ``rel``.

    Args:
        rel: path relative to the source root, ``/``-separated (e.g. ``site0/v1/f001.jpg``).

    Returns:
        e.g. ``site0_v1_f001_jpg-3f2a9c1d``; only ``[A-Za-z0-9_-]`` characters.
    """
    digest = hashlib.sha1(path_bytes(rel)).hexdigest()[:8]
    return f"{_UNSAFE.sub('_', display_path(rel))}-{digest}"


def site_of(rel: str, level: int = 0) -> str:
    """The site/centre of a file: its ``level``-th folder below the root ("" when shallower).

    Args:
        rel: POSIX relative path of the file.
        level: which folder level names the site (0 = the first folder under the root).
    """
    folders = rel.split("/")[:-1]
    return display_path(folders[level]) if 0 <= level < len(folders) else ""


def is_image_name(rel: str, extensions: tuple[str, ...] | list[str] = IMAGE_EXTENSIONS) -> bool:
    """Whether the file name has one of ``extensions`` (case-insensitive)."""
    return os.path.splitext(rel)[1].lower() in {e.lower() for e in extensions}
