"""Bounds and integrity checks on raw inputs: what is listed, what is read, what is decoded.

``dataeff shard`` accounts for every path under ``src`` (an index row each, docs/ingest.md)
and must not let one input take the job down or its memory up:

- :func:`scan_tree` lists every path, following links to folders but never into a folder
  that is already on its own path (a loop gets a row, ``symlink_loop``); links to nothing,
  FIFOs, sockets, devices and folders that cannot be listed get rows with their reason and
  are never opened;
- :func:`read_input` reads a file only when it is a regular file no larger than
  ``max_bytes`` (checked on the open file before a byte is read, and again while reading,
  in case the file grows);
- :func:`decode_error` runs between parsing an image header and decoding it: the memory
  the decoder would allocate (width x height x channels x bytes per sample, so 16-bit and
  multi-channel images count at their real size) against a byte budget, every PNG chunk's
  CRC, and libjpeg's strict mode over the JPEG entropy data (at 1/8 scale, so it costs a
  fraction of the decode), which reports a stream cut short and padded out with an end
  marker, a damage PIL decodes as grey without a word.

Pure functions of paths and bytes; reasons are the constants of :mod:`dataeff.constants`.
"""

from __future__ import annotations

import errno
import os
import stat
import zlib
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageMode

from dataeff.config import ConfigError
from dataeff.constants import (
    BAD_CHECKSUM,
    BROKEN_LINK,
    CORRUPT_DATA,
    NOT_A_REGULAR_FILE,
    READ_ERROR,
    SYMLINK_LOOP,
    TOO_LARGE,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
JPEG_MAGIC = b"\xff\xd8\xff"
#: PNG colour type -> samples per pixel (grey, RGB, palette, grey + alpha, RGBA).
_PNG_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}


@dataclass(frozen=True)
class Entry:
    """A path under the source root: its POSIX relative path, size in bytes, and why it is not read.

    ``reason`` is empty for a regular file (or a link to one) to be inspected.
    """

    rel: str
    size: int
    reason: str = ""


@dataclass(frozen=True)
class Unread:
    """A file :func:`read_input` refused to read, with the reason and the size it saw (0 if none)."""

    reason: str
    size: int = 0


# --------------------------------------------------------------------------- listing


def _stat_reason(path: str, exc: OSError) -> str:
    """The reason code of a path whose target cannot be stat'ed or opened."""
    if exc.errno == errno.ELOOP:
        return SYMLINK_LOOP
    if exc.errno == errno.ENOENT and os.path.islink(path):
        return BROKEN_LINK
    return READ_ERROR


def scan_tree(src: str | os.PathLike, exclude: str | os.PathLike | None = None) -> list[Entry]:
    """Every path under ``src`` as an :class:`Entry`, sorted by relative path.

    Links to files count as files. Links to folders are followed, except into a folder
    already on the path from ``src`` (compared by device and inode, so bind mounts count
    too): that link is an entry with reason ``symlink_loop``. ``exclude`` (the output
    folder, when it lies inside ``src``) is left out.

    Raises:
        ConfigError: ``src`` itself cannot be listed.
    """
    skip = os.path.realpath(exclude) if exclude is not None else None
    found: list[Entry] = []

    def walk(folder: str, prefix: str, ancestors: frozenset[tuple[int, int]]) -> None:
        try:
            with os.scandir(folder) as it:
                children = list(it)
        except OSError as exc:
            if not prefix:
                raise ConfigError(f"src={src}: cannot list it ({exc.strerror})") from None
            found.append(Entry(prefix[:-1], 0, READ_ERROR))
            return
        for child in children:
            rel = prefix + child.name
            try:
                info = os.stat(child.path)  # follows links: a link is judged by what it points to
            except OSError as exc:
                found.append(Entry(rel, 0, _stat_reason(child.path, exc)))
                continue
            if stat.S_ISDIR(info.st_mode):
                if skip is not None and os.path.realpath(child.path) == skip:
                    continue
                inode = (info.st_dev, info.st_ino)
                if inode in ancestors:
                    found.append(Entry(rel, 0, SYMLINK_LOOP))
                else:
                    walk(child.path, rel + "/", ancestors | {inode})
            elif stat.S_ISREG(info.st_mode):
                found.append(Entry(rel, info.st_size))
            else:
                found.append(Entry(rel, 0, NOT_A_REGULAR_FILE))

    root = os.stat(src)
    walk(os.fspath(src), "", frozenset({(root.st_dev, root.st_ino)}))
    return sorted(found, key=lambda e: e.rel)


# --------------------------------------------------------------------------- reading


def read_input(path: str | os.PathLike, max_bytes: int) -> bytes | Unread:
    """The bytes of the regular file at ``path``, or why they were not read.

    The size is taken from the open file before reading (``too_large`` costs no read)
    and at most ``max_bytes + 1`` bytes are ever read (0 = no limit). The file is opened
    non-blocking, so a FIFO that replaced a file since the listing cannot stall a worker.
    """
    path = os.fspath(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as exc:
        return Unread(_stat_reason(path, exc))
    try:
        with os.fdopen(fd, "rb") as fh:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                return Unread(NOT_A_REGULAR_FILE)
            if max_bytes and info.st_size > max_bytes:
                return Unread(TOO_LARGE, info.st_size)
            data = fh.read(max_bytes + 1 if max_bytes else -1)
    except OSError:
        return Unread(READ_ERROR)
    if max_bytes and len(data) > max_bytes:
        return Unread(TOO_LARGE, len(data))
    return data


# --------------------------------------------------------------------------- before decoding


def decoded_bytes(img: Image.Image, data: bytes) -> int:
    """Bytes of the pixels the decoder produces for ``img`` (opened, not yet loaded).

    A PNG counts at its header's bit depth and colour type (a 16-bit RGBA PNG is 8 bytes a
    pixel, even where PIL keeps fewer); other formats at the PIL mode's band count times
    its sample size (``I;16`` is 2 bytes, ``I`` and ``F`` 4, ``RGB`` 3).
    """
    w, h = img.size
    if data.startswith(PNG_MAGIC) and len(data) >= 26:
        depth, colour = data[24], data[25]
        return w * h * _PNG_CHANNELS.get(colour, 4) * max(depth, 8) // 8
    mode = ImageMode.getmode(img.mode)
    return w * h * len(mode.bands) * np.dtype(mode.typestr).itemsize


def png_error(data: bytes) -> str:
    """``bad_checksum`` if a chunk's CRC does not match, ``truncated`` if the chunks end before IEND, else ''."""
    view = memoryview(data)
    pos = len(PNG_MAGIC)
    while pos + 12 <= len(data):
        length = int.from_bytes(view[pos : pos + 4], "big")
        end = pos + 12 + length
        if end > len(data):
            return "truncated"
        if zlib.crc32(view[pos + 4 : end - 4]) != int.from_bytes(view[end - 4 : end], "big"):
            return BAD_CHECKSUM
        if view[pos + 4 : pos + 8] == b"IEND":
            return ""
        pos = end
    return "truncated"


def jpeg_error(data: bytes) -> str:
    """``truncated`` or ``corrupt_data`` when libjpeg-turbo's strict mode reports damaged entropy data, else ''.

    Decoded in grey at 1/8 scale: every entropy-coded block is still read, most of the
    inverse transform is skipped. A file libjpeg-turbo cannot decode at all (12-bit,
    lossless) is left to PIL's decode to judge.
    """
    import simplejpeg

    try:
        simplejpeg.decode_jpeg(data, colorspace="GRAY", min_factor=8, strict=True)
    except ValueError as exc:
        try:
            simplejpeg.decode_jpeg(data, colorspace="GRAY", min_factor=8, strict=False)
        except ValueError:
            return ""
        return "truncated" if "premature end" in str(exc).lower() else CORRUPT_DATA
    return ""


def decode_error(img: Image.Image, data: bytes, max_decoded_bytes: int) -> str:
    """Why ``img`` (opened from ``data``, not yet loaded) must not be decoded, or ''.

    ``decompression_bomb`` when its pixels would take more than ``max_decoded_bytes``
    (0 = no limit); then the format checks (:func:`png_error`, :func:`jpeg_error`).
    """
    if max_decoded_bytes and decoded_bytes(img, data) > max_decoded_bytes:
        return "decompression_bomb"
    if data.startswith(PNG_MAGIC):
        return png_error(data)
    if data.startswith(JPEG_MAGIC):
        return jpeg_error(data)
    return ""
