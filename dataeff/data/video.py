"""Videos (mp4, avi, mov, mkv) as frame samples, decoded with PyAV (``dataeff shard``, ``video.*``).

Frames come in presentation order, numbered from 0 in decode order of the whole video
(sampled or not), with their time in seconds from the start of the stream. A video PyAV
cannot open, without a video stream, or without one decodable frame is rejected
(``video_undecodable``); one that breaks off or holds damaged packets keeps the frames it
decoded, and the frames it lost (frames the container announces but that never decoded, or
packets that failed) are counted (:class:`VideoFrames`).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from dataeff.config import ConfigError, option
from dataeff.constants import VIDEO_UNDECODABLE
from dataeff.data.frames import Frame, FrameOptions, MediaRejected, Sampler

__all__ = ["VideoConfig", "VideoFrames", "require_av"]

VIDEO_EXTENSIONS = (".mp4", ".avi", ".mov", ".mkv")


def require_av(instead: str = "set video.extensions=[] to list video files as unsupported_extension") -> Any:
    """The ``av`` module (PyAV), or a ConfigError saying how to install it or what to do ``instead``."""
    try:
        import av
    except ImportError:
        raise ConfigError(f"videos need PyAV: pip install 'dataeff[video]', or {instead}") from None
    return av


@dataclass
class VideoConfig:
    """Which files are videos and which frames become samples (``video.*``; also multi-frame DICOM/TIFF)."""

    every_n: int = option(1, help="keep every n-th frame of a video or multi-frame file (1 = every frame)")
    fps: float = option(0.0, help="keep at most this many frames per second of video time (0 = no limit)")
    max_frames: int = option(0, help="keep at most this many frames per file, the first ones sampled (0 = all)")
    extensions: list = option(list(VIDEO_EXTENSIONS), help="file extensions read as videos (case-insensitive)")

    def __post_init__(self) -> None:
        if self.every_n < 1:
            raise ConfigError(f"video.every_n={self.every_n}: must be at least 1")
        if self.fps < 0 or self.max_frames < 0:
            raise ConfigError("video.fps and video.max_frames must be >= 0 (0 = no limit)")
        if self.every_n > 1 and self.fps > 0:
            raise ConfigError("video.every_n and video.fps both set: sample by frame count or by time, not both")
        if any(not str(e).startswith(".") for e in self.extensions):
            raise ConfigError(f"video.extensions={self.extensions}: give a list like ['.mp4', '.avi']")


class VideoFrames:
    """The sampled frames of one video; after iteration, :attr:`decoded` and :attr:`lost` frame counts."""

    def __init__(self, path: str | os.PathLike, opts: FrameOptions):
        self.path, self.opts = os.fspath(path), opts
        self.decoded = self.lost = 0

    def __iter__(self) -> Iterator[Frame]:
        av = require_av()
        try:
            container = av.open(self.path)
        except Exception:  # FFmpeg's many error types all mean "not a video we can read"
            raise MediaRejected(VIDEO_UNDECODABLE) from None
        with container:
            if not container.streams.video:
                raise MediaRejected(VIDEO_UNDECODABLE)
            stream = container.streams.video[0]
            expected = int(stream.frames or 0)
            start = float(stream.start_time * stream.time_base) if stream.start_time is not None else 0.0
            sampler, failed, stopped = Sampler(self.opts), 0, False
            packets = container.demux(stream)
            while not stopped:
                try:
                    packet = next(packets)
                except StopIteration:
                    break
                except Exception:  # the container breaks off (truncated, damaged index): keep what we have
                    failed += 1
                    break
                try:
                    frames = packet.decode()
                except Exception:  # a damaged packet: its frame is lost, the next key frame recovers
                    failed += 1
                    continue
                for frame in frames:
                    index, self.decoded = self.decoded, self.decoded + 1
                    time = float(frame.time) - start if frame.time is not None else math.nan
                    if sampler.wants(index, time):
                        yield Frame(index, time, frame.to_ndarray(format="rgb24"))
                    if sampler.full:
                        stopped = True
                        break
        if self.decoded == 0:
            raise MediaRejected(VIDEO_UNDECODABLE)
        if not stopped:
            self.lost = max(expected - self.decoded, failed, 0)
