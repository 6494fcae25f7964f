"""Multi-frame inputs (videos, multi-frame DICOM, multi-page TIFF) as samples, one per kept frame.

A frame source (:mod:`dataeff.data.video`, :mod:`dataeff.data.dicom`, or a TIFF's pages) yields
:class:`Frame` objects for the frames a :class:`Sampler` wants; :func:`inspect_frames` runs each
through the same checks as a still image (:func:`dataeff.data.quality.inspect_bytes`: size,
quality statistics, signatures) and gives it its provenance: a key made of the file's key and
the frame number, the source file, the frame index, the timestamp and the group.
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from typing import Protocol

import numpy as np
from PIL import Image

from dataeff.data.decode import array_image, tiff_page_count, tiff_pages
from dataeff.data.quality import Inspected, InspectOptions, inspect_bytes, long_side_size

__all__ = [
    "Frame", "FrameOptions", "FrameSource", "Sampler", "TiffPages", "MediaRejected", "frame_key", "inspect_frames",
]  # fmt: skip


class MediaRejected(Exception):
    """A multi-frame file gives no frame; ``reason`` is its index reason code (never file content)."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class FrameOptions:
    """Which files are multi-frame sources and which of their frames to keep (``video.*``, ``dicom.*``)."""

    every_n: int = 1
    fps: float = 0.0
    max_frames: int = 0
    video_extensions: tuple[str, ...] = (".mp4", ".avi", ".mov", ".mkv")
    dicom_extensions: tuple[str, ...] = (".dcm", ".dicom")


@dataclass
class Frame:
    """One decoded frame: its number in the file (0-based), time in seconds (NaN unknown), pixels.

    Shape:
        pixels: (H, W) or (H, W, C), integer dtype (see :func:`dataeff.data.decode.array_image`).
    """

    index: int
    time: float
    pixels: np.ndarray


class Sampler:
    """Decides frame by frame which frames to keep, in file order.

    A frame is kept when its index is a multiple of ``every_n``, when (``fps`` > 0 and the
    frame has a time) it is the first frame of a new ``1/fps``-second slot, and while fewer
    than ``max_frames`` (0 = no limit) frames were kept; :attr:`full` tells a reader to stop.
    """

    def __init__(self, opts: FrameOptions):
        self.opts, self.kept, self.slot = opts, 0, -1

    @property
    def full(self) -> bool:
        return self.opts.max_frames > 0 and self.kept >= self.opts.max_frames

    def wants(self, index: int, time: float) -> bool:
        if self.full or index % self.opts.every_n:
            return False
        if self.opts.fps > 0 and not math.isnan(time):
            slot = math.floor(time * self.opts.fps + 1e-6)
            if slot <= self.slot:
                return False
            self.slot = slot
        self.kept += 1
        return True


class FrameSource(Protocol):
    """A multi-frame file: iterating yields its kept frames (or raises :class:`MediaRejected` when
    none decodes); afterwards ``lost`` counts the frames that failed."""

    lost: int

    def __iter__(self) -> Iterator[Frame]: ...


class TiffPages:
    """A multi-page TIFF's pages as frames (no timing); a damaged page ends the file, the rest counted lost."""

    def __init__(self, data: bytes, opts: FrameOptions):
        self.data, self.sampler, self.lost = data, Sampler(opts), 0

    def __iter__(self) -> Iterator[Frame]:
        pages = tiff_pages(self.data)
        index = 0
        while not self.sampler.full:
            try:
                page = next(pages)
            except StopIteration:
                return
            except Exception:  # tifffile raises many types for a damaged page
                if index == 0:
                    raise MediaRejected("truncated") from None
                self.lost = max(tiff_page_count(self.data) - index, 1)
                return
            if self.sampler.wants(index, math.nan):
                yield Frame(index, math.nan, page)
            index += 1


def frame_key(base: str, index: int) -> str:
    """The key of frame ``index`` of the file whose key (or key base) is ``base``."""
    return f"{base}-f{index:06d}"


def _payload(pixels: np.ndarray, max_side: int, lossy: bool, quality: int) -> bytes:
    """A frame as the file to check and store: JPEG (lossy sources) or PNG, shrunk to ``max_side`` first.

    Shrinking here keeps a lossy frame from being JPEG-encoded twice.
    """
    img = array_image(pixels)
    size = long_side_size(img.width, img.height, max_side)
    if size != img.size:
        img = img.resize(size, Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    if lossy:
        img.convert("RGB").save(buf, format="JPEG", quality=quality)
    else:
        img.save(buf, format="PNG")
    return buf.getvalue()


def inspect_frames(
    rel: str, frames: Iterable[Frame], opts: InspectOptions, key_base: str, group: str, lossy: bool
) -> list[Inspected]:
    """Check each frame like a still image; rows keyed ``<key_base>-f<index>`` with provenance.

    Args:
        rel: POSIX path of the file relative to the source root (the rows' ``source``).
        frames: the kept frames, in file order.
        opts: the shard's inspection options.
        key_base: the file's part of the keys (``[A-Za-z0-9_-]`` only).
        group: the rows' ``group`` (the video, or the DICOM study).
        lossy: store frames as JPEG at ``opts.jpeg_quality`` (the source was lossy), else PNG.
    """
    frame_opts = replace(opts, extensions=(os.path.splitext(rel)[1].lower(),), max_side=0)
    out = []
    for frame in frames:
        item = inspect_bytes(_payload(frame.pixels, opts.max_side, lossy, opts.jpeg_quality), rel, frame_opts)
        place = {
            "key": frame_key(key_base, frame.index),
            "group": group,
            "frame": frame.index,
            "timestamp": None if math.isnan(frame.time) else round(frame.time, 6),
        }
        item.row.update(place)
        if item.meta is not None:
            item.meta.update(place)
        out.append(item)
    return out
