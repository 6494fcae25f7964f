"""Pure input checks for sharding: decode, reject with a reason, convert to 8-bit RGB, stats.

:func:`inspect_bytes` is the per-file core of ``dataeff shard``: bytes in, an index row
and the bytes to store out, no I/O, so it runs the same in any worker process.

Quality statistics follow docs/architecture.md: computed on a 128-px grayscale
thumbnail in [0, 255] — mean and standard deviation of the intensity, variance of
the 3x3 Laplacian (a standard focus/blur measure: low variance = few edges), and
the fractions of pixels below 16 (dark) and above 240 (over-exposed). MedDEL uses
them to drop invalid frames (black, over-exposed, blurred) before clustering.

Every stored sample also gets its image signatures (:mod:`dataeff.data.signatures`:
decoded-pixel sha256, 64-bit pHash, 16 x 16 thumbnail), computed here from the image
the check has just decoded, in the parallel shard workers, so the leakage guard and
MedDEL read them from the index instead of decoding the pool again.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image, ImageFile

from dataeff.constants import QUALITY_KEYS, SIGNATURE_KEYS
from dataeff.data.decode import UnreadableMode, exif_orientation, open_image, orient, swaps_sides, to_rgb
from dataeff.data.decode import wide_to_uint8 as wide_to_uint8  # re-export: its home before decode.py
from dataeff.data.integrity import decode_error
from dataeff.data.keys import IMAGE_EXTENSIONS, display_path, is_image_name, make_key, site_of
from dataeff.data.signatures import GRAY_SIDE, gray_base, image_signature
from dataeff.data.signatures import gray_thumbnail as gray_thumbnail  # re-export: mosaics compute stats with it

#: Long side of the grayscale thumbnail the statistics are computed on (shared with the signatures).
THUMB_SIDE = GRAY_SIDE
DARK_LEVEL = 16
BRIGHT_LEVEL = 240


def long_side_size(w: int, h: int, max_side: int) -> tuple[int, int]:
    """Size of a ``w`` x ``h`` image shrunk so its long side is at most ``max_side`` (0 = unchanged)."""
    if max_side <= 0 or max(w, h) <= max_side:
        return w, h
    scale = max_side / max(w, h)
    return max(1, round(w * scale)), max(1, round(h * scale))


def _mean_var(x: np.ndarray) -> tuple[float, float]:
    """Mean and (population) variance from sums; exact for integer input, fast for small arrays."""
    n = x.size
    acc = np.int64 if x.dtype.kind in "iu" else np.float64
    s, ss = x.sum(dtype=acc), (x * x).sum(dtype=acc)  # not np.dot: BLAS threads stall busy workers
    mean = float(s) / n
    return mean, max(float(ss) / n - mean * mean, 0.0)


def laplacian(gray: np.ndarray) -> np.ndarray:
    """3x3 Laplacian (4-neighbour kernel) over the valid interior.

    Shape:
        gray: (H, W) -> (H-2, W-2); int32 for integer input, float64 otherwise.
    """
    g: np.ndarray = gray.astype(np.int32 if gray.dtype.kind in "iu" else np.float64)
    return g[:-2, 1:-1] + g[2:, 1:-1] + g[1:-1, :-2] + g[1:-1, 2:] - 4 * g[1:-1, 1:-1]


def laplacian_var(gray: np.ndarray) -> float:
    """Variance of the 3x3 Laplacian; 0.0 when H or W < 3.

    Shape:
        gray: (H, W) in [0, 255].
    """
    if gray.shape[0] < 3 or gray.shape[1] < 3:
        return 0.0
    return _mean_var(laplacian(gray))[1]


def quality_stats(gray: np.ndarray) -> dict[str, float]:
    """Quality statistics of a grayscale thumbnail.

    Shape:
        gray: (H, W) in [0, 255], uint8 (see :func:`gray_thumbnail`) or float.

    Returns:
        ``{"mean", "std", "laplacian_var", "dark_frac", "bright_frac"}``, rounded to 6 digits
        so that the JSON and the index carry the same values.
    """
    g = gray.astype(np.int32) if gray.dtype.kind in "iu" else gray.astype(np.float64)
    mean, var = _mean_var(g)
    stats = {
        "mean": mean,
        "std": var**0.5,
        "laplacian_var": laplacian_var(g),
        "dark_frac": np.count_nonzero(g < DARK_LEVEL) / g.size,
        "bright_frac": np.count_nonzero(g > BRIGHT_LEVEL) / g.size,
    }
    return {k: round(float(v), 6) for k, v in stats.items()}


# --------------------------------------------------------------------------- per-file inspection

#: File signatures of the supported formats: a file that starts like an image but does
#: not open or decode is ``truncated`` (damaged), anything else is ``not_an_image``.
_MAGIC = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"BM", b"II*\x00", b"MM\x00*")
#: Index columns holding quality statistics (NaN/None for files that did not decode).


@dataclass(frozen=True)
class InspectOptions:
    """What :func:`inspect_bytes` accepts and how it stores a sample (see ``ShardConfig``)."""

    min_side: int = 32
    max_pixels: int = 89_478_485
    max_bytes: int = 1 << 28
    max_decoded_bytes: int = 1 << 29
    max_side: int = 0
    jpeg_quality: int = 95
    site_level: int = 0
    extensions: tuple[str, ...] = IMAGE_EXTENSIONS
    exif_transpose: bool = True


@dataclass
class Inspected:
    """One input file's index row (``shard`` still empty) and, when ok, what to store.

    ``payload`` is the image file to write (``ext`` is ``jpg`` or ``png``) and ``meta`` the
    sample's JSON fields; both are None for rejected files.
    """

    row: dict[str, Any]
    payload: bytes | None = None
    ext: str = ""
    meta: dict[str, Any] | None = field(default=None)


@contextlib.contextmanager
def pil_limits(max_pixels: int) -> Iterator[None]:
    """Run with PIL's bomb limit at ``max_pixels`` (0 = none) and truncated loads refused.

    Another library in the process may have switched ``LOAD_TRUNCATED_IMAGES`` on; a
    truncated file would then decode into grey padding and pass as ``ok``.
    """
    saved = (Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES)
    Image.MAX_IMAGE_PIXELS = max_pixels if max_pixels > 0 else None
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES = saved


def _row(rel: str, data: bytes, opts: InspectOptions) -> dict[str, Any]:
    row: dict[str, Any] = {
        "key": make_key(rel),
        "source": display_path(rel),
        "site": site_of(rel, opts.site_level),
        "status": "ok",
        "reason": "",
        "shard": "",
        "size": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
        "width": 0,
        "height": 0,
        "orientation": 1,
    }
    row.update({k: None for k in QUALITY_KEYS + SIGNATURE_KEYS})
    return row


def _reject(row: dict[str, Any], reason: str) -> Inspected:
    row["status"], row["reason"] = "rejected", reason
    return Inspected(row)


def reject_unread(rel: str, size: int, reason: str, opts: InspectOptions) -> Inspected:
    """The rejected row of a file refused as a whole (never read, or no usable frame): no checksum."""
    row = _row(rel, b"", opts)
    row.update(size=size, sha256="")
    return _reject(row, reason)


def _encode(img: Image.Image, as_jpeg: bool, quality: int) -> bytes:
    buf = io.BytesIO()
    if as_jpeg:
        img.save(buf, format="JPEG", quality=quality)
    else:
        img.save(buf, format="PNG")
    return buf.getvalue()


def inspect_bytes(data: bytes, rel: str, opts: InspectOptions) -> Inspected:
    """Check one input file and prepare its sample.

    Order of checks: zero_byte, unsupported_extension, not_an_image (no image header),
    decompression_bomb (more than ``max_pixels`` pixels, or pixels taking more than
    ``max_decoded_bytes``; checked before decoding), bad_checksum / truncated / corrupt_data
    (a PNG chunk CRC, JPEG entropy data; :func:`~dataeff.data.integrity.decode_error`),
    truncated (damaged or cut short: the full decode fails), too_small (short side below
    ``min_side``), unreadable_mode (no 8-bit RGB rendering). CMYK, palette, grayscale,
    alpha and 16-bit images are converted to RGB. The original bytes are stored when
    the file is an RGB JPEG/PNG that needs no resize; otherwise the RGB image is
    re-encoded (JPEG at ``jpeg_quality`` for JPEG sources, PNG for lossless ones).

    Must run inside :func:`pil_limits` (workers enter it once at start-up).

    Args:
        data: the file's bytes.
        rel: its POSIX path relative to the source root.
        opts: acceptance and storage options.
    """
    row = _row(rel, data, opts)
    if not data:
        return _reject(row, "zero_byte")
    if not is_image_name(rel, opts.extensions):
        return _reject(row, "unsupported_extension")
    damaged = "truncated" if data.startswith(_MAGIC) else "not_an_image"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # EXIF/ICC chatter from damaged files; the reason says enough
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            img = open_image(data)  # TIFFs through tifffile, decoded already
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            return _reject(row, "decompression_bomb")
        except UnreadableMode:  # a TIFF whose pixel data has no 8-bit rendering (float, complex)
            return _reject(row, "unreadable_mode")
        except Exception:  # PIL raises many types for garbage input; all mean the same here
            return _reject(row, damaged)
        (w, h), fmt, mode = img.size, img.format, img.mode
        if opts.max_pixels > 0 and w * h > opts.max_pixels:
            return _reject(row, "decompression_bomb")
        reason = decode_error(img, data, opts.max_decoded_bytes)
        if reason:
            return _reject(row, reason)
        row["orientation"] = turn = exif_orientation(img) if opts.exif_transpose else 1
        size = long_side_size(w, h, opts.max_side)
        keep = fmt in ("JPEG", "PNG") and mode == "RGB" and size == (w, h) and turn == 1
        if fmt == "JPEG" and (not keep or min(w, h) >= 2 * THUMB_SIDE):
            # libjpeg's DCT scaling still reads every entropy-coded block (so truncation and
            # damage are found exactly as in a full decode) but skips most of the inverse
            # transform: a kept JPEG only needs its 128-px grayscale thumbnail (quality
            # statistics, pHash, thumbnail), a resized one its target size. A kept JPEG that
            # DCT scaling cannot halve (short side < 256 px) is decoded in full, in RGB, so
            # its pixel hash comes for free.
            img.draft("L" if keep else mode, (THUMB_SIDE, THUMB_SIDE) if keep else size)
        try:
            img.load()  # decodes the whole file: a truncated one fails here, not at open()
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            return _reject(row, "decompression_bomb")
        except Exception:
            return _reject(row, "truncated")
    if swaps_sides(turn):  # a quarter turn: sizes from here on are of the upright picture
        w, h, size = h, w, size[::-1]
    img = orient(img, turn)
    row["width"], row["height"] = w, h
    if min(w, h) < opts.min_side:
        return _reject(row, "too_small")
    try:
        rgb = img if keep else to_rgb(img)
    except UnreadableMode:
        return _reject(row, "unreadable_mode")
    if keep:
        payload, ext = data, ("jpg" if fmt == "JPEG" else "png")
        stored = rgb
    else:
        stored = rgb if rgb.size == size else rgb.resize(size, Image.Resampling.LANCZOS)
        as_jpeg = fmt in ("JPEG", "MPO")
        payload, ext = _encode(stored, as_jpeg, opts.jpeg_quality), ("jpg" if as_jpeg else "png")
    row["width"], row["height"] = size
    base = gray_base(stored)  # once, for the quality statistics and the signatures
    row.update(quality_stats(np.asarray(base)))
    # Signatures of the pixels the stage encoded: the stored pixels whenever the payload is
    # the original file or a PNG; for a re-encoded JPEG, the pixels before the lossy step.
    # A kept JPEG decoded with DCT scaling never held its full-size pixels, and decoding
    # them only to hash them would cost more than the rest of the stage (docs/ingest.md):
    # no pixel hash then; the byte sha256 (same file) and the pHash (same picture) remain.
    row.update(image_signature(stored, base, pixel_hash=stored.mode == "RGB" and stored.size == size))
    meta = {
        "key": row["key"],
        "source": row["source"],
        "site": row["site"],
        "width": row["width"],
        "height": row["height"],
        "sha256": row["sha256"],
        "mode": mode,
        "quality": {k: row[k] for k in QUALITY_KEYS},
    }
    return Inspected(row, payload, ext, meta)
