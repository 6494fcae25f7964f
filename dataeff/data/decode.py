"""Decoding still images the way public datasets publish them: one module for shard and downstream.

- PIL reads JPEG, PNG and BMP lazily (``dataeff shard`` still uses JPEG DCT scaling on it).
- Every TIFF goes through tifffile: PIL refuses or misreads common variants (8-bit RGB data
  labelled ``PhotometricInterpretation = MinIsBlack`` with 3 samples per pixel, as some
  public polyp sets ship; 16-bit grayscale, which PIL's RGB conversion clips). 16-bit data is
  scaled to 8 bits (:func:`wide_to_uint8`); a multi-page TIFF reads as its first page here
  (``dataeff shard`` takes every page as a frame, :func:`tiff_pages`).
- EXIF orientation (tag 274) is applied on request (:func:`orient`): a portrait photo stored
  sideways comes out upright.

No function here writes or logs anything; callers turn exceptions into reasons or errors.
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterator

import numpy as np
from PIL import Image

__all__ = [
    "TIFF_MAGIC", "UnreadableMode", "is_tiff", "open_image", "tiff_pages", "array_image", "wide_to_uint8",
    "to_rgb", "exif_orientation", "orient", "swaps_sides", "tiff_page_count", "read_rgb", "read_image", "decoded_size",
]  # fmt: skip

#: First bytes of a TIFF (little/big endian) and of a BigTIFF.
TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
#: EXIF orientations that swap width and height (a quarter turn, with or without a mirror).
_SWAPS = frozenset({5, 6, 7, 8})
_EXIF_ORIENTATION = 0x0112

#: Modes converted to RGB with PIL's own conversion (no value scaling needed).
_DIRECT_MODES = frozenset(
    {"RGB", "RGBA", "RGBX", "RGBa", "L", "LA", "La", "1", "P", "PA", "CMYK", "YCbCr", "LAB", "HSV"}
)
#: Integer modes wider than 8 bits: scaled to 8 bits, then replicated to RGB.
_WIDE_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I"})


class UnreadableMode(ValueError):
    """The image decodes but its pixel layout has no faithful 8-bit rendering (e.g. float ``F``)."""


def is_tiff(data: bytes) -> bool:
    return data[:4] in TIFF_MAGIC


#: Values converted at a time when scaling a wide image to 8 bits: temporaries stay ~32 MB
#: whatever the image size (a whole 9000 x 9000 image in float64 would be 648 MB each).
_BLOCK_VALUES = 1 << 22


def wide_to_uint8(values: np.ndarray, lo: int | None = None, hi: int | None = None) -> np.ndarray:
    """Scale a 16/32-bit integer image to 8 bits.

    Values inside [0, 65535] are taken as 16-bit and mapped linearly with rounding
    (65535 -> 255, i.e. divide by 257), which keeps the intensity scale across images;
    anything outside that range is stretched from its own min..max.

    Args:
        lo, hi: the image's min and max, when ``values`` is one block of rows of it
            (default: those of ``values``).

    Shape:
        values: any shape, any integer dtype -> the same shape, uint8.
    """
    if lo is None or hi is None:
        lo, hi = (int(values.min()), int(values.max())) if values.size else (0, 0)
    v = values.astype(np.float64)
    if lo >= 0 and hi <= 65535:
        scaled = v / 257.0
    elif hi > lo:
        scaled = (v - lo) * (255.0 / (hi - lo))
    else:
        scaled = np.zeros_like(v)
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def _wide_to_gray(img: Image.Image) -> Image.Image:
    """A 16/32-bit integer image as 8-bit ``L`` (:func:`wide_to_uint8`), converted a block of rows at a time."""
    lo, hi = img.getextrema()  # one band: (min, max)
    assert isinstance(lo, (int, float)) and isinstance(hi, (int, float))
    gray = np.empty((img.height, img.width), dtype=np.uint8)
    rows = max(1, _BLOCK_VALUES // max(img.width, 1))
    for top in range(0, img.height, rows):
        bottom = min(top + rows, img.height)
        gray[top:bottom] = wide_to_uint8(np.asarray(img.crop((0, top, img.width, bottom))), int(lo), int(hi))
    return Image.fromarray(gray, "L")


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert a decoded image of any supported mode to 8-bit RGB.

    Palette, grayscale, CMYK and alpha images use PIL's conversion (alpha is dropped);
    16-bit images are scaled by :func:`wide_to_uint8`, not truncated.

    Raises:
        UnreadableMode: for modes without a faithful 8-bit rendering (``F`` and exotic ones).
    """
    if img.mode == "RGB":
        return img
    if img.mode in ("P", "PA"):
        # A palette may carry transparency; go through RGBA so PIL applies it, then drop alpha.
        return img.convert("RGBA").convert("RGB")
    if img.mode in _DIRECT_MODES:
        return img.convert("RGB")
    if img.mode in _WIDE_MODES:
        return _wide_to_gray(img).convert("RGB")
    raise UnreadableMode(f"pixel mode {img.mode!r} has no 8-bit RGB rendering")


def array_image(values: np.ndarray) -> Image.Image:
    """A decoded pixel array as an 8-bit PIL image: ``L`` for one channel, ``RGB`` for three or more.

    Integer data wider than 8 bits is scaled by :func:`wide_to_uint8`; a second channel of
    two (gray + alpha) and channels after the third (alpha, extra samples) are dropped.

    Shape:
        values: (H, W) or (H, W, C), integer or bool dtype.

    Raises:
        UnreadableMode: float or complex data, or another shape.
    """
    if values.dtype.kind not in "biu" or values.ndim not in (2, 3):
        raise UnreadableMode(f"pixel data {values.dtype} of shape {values.shape} has no 8-bit rendering")
    if values.dtype == bool:
        values = values.astype(np.uint8) * 255
    elif values.dtype != np.uint8:
        values = wide_to_uint8(values) if values.dtype.itemsize > 1 else values.astype(np.uint8)
    if values.ndim == 3:
        values = values[:, :, 0] if values.shape[2] < 3 else values[:, :, :3]
    return Image.fromarray(np.ascontiguousarray(values), "L" if values.ndim == 2 else "RGB")


def _check_pixels(shape: tuple[int, ...]) -> None:
    """Refuse a page PIL's bomb limit (``Image.MAX_IMAGE_PIXELS``) would refuse, before decoding it."""
    limit = Image.MAX_IMAGE_PIXELS
    if limit and len(shape) >= 2 and shape[0] * shape[1] > limit:
        raise Image.DecompressionBombError(f"{shape[1]} x {shape[0]} pixels exceed the limit of {limit}")


def tiff_pages(data: bytes) -> Iterator[np.ndarray]:
    """The pages of a TIFF's first image series, decoded one at a time, samples last.

    Shape:
        each page: (H, W) or (H, W, S), the file's dtype (planar files transposed).

    Raises:
        Image.DecompressionBombError: a page larger than PIL's pixel limit (checked first).
        Exception: whatever tifffile raises for a damaged file.
    """
    import tifffile  # the still-image path of JPEG/PNG sources never needs it

    with tifffile.TiffFile(io.BytesIO(data)) as tif:
        series = tif.series[0]
        for page in series.pages:
            keyframe = page.keyframe if page is not None else None
            if page is None or keyframe is None:
                continue
            axes = keyframe.axes
            if "Y" not in axes or "X" not in axes:
                raise UnreadableMode(f"TIFF page axes {axes!r} hold no picture")
            _check_pixels(tuple(keyframe.shape[axes.index(a)] for a in "YX"))
            values = page.asarray()
            if "S" in axes and axes.index("S") < axes.index("Y"):  # planar: (S, Y, X) -> (Y, X, S)
                values = np.moveaxis(values, axes.index("S"), -1)
            yield values.squeeze(axis=tuple(i for i in range(values.ndim - 2) if values.shape[i] == 1))


def tiff_page_count(data: bytes) -> int:
    """Pages in a TIFF's first image series (0 when tifffile cannot parse it)."""
    import tifffile

    try:
        with tifffile.TiffFile(io.BytesIO(data)) as tif:
            return len(tif.series[0].pages) if tif.series else 0
    except Exception:  # a damaged TIFF: the decoder that reads it gives the reason
        return 0


def open_image(data: bytes, values: bool = False) -> Image.Image:
    """The image in ``data``: PIL's lazy image, or a TIFF's first page decoded through tifffile.

    A TIFF comes back already decoded with ``format`` None: 8-bit (``L`` or ``RGB``), or with
    ``values`` (masks, whose values are class ids) a one-channel page as stored (``L``,
    ``I;16`` or ``I``) instead of scaled.

    Raises:
        Image.DecompressionBombError: more pixels than PIL's limit.
        Exception: what PIL or tifffile raise for data they cannot read.
    """
    if is_tiff(data):
        page = next(tiff_pages(data), None)
        if page is None:
            raise UnreadableMode("TIFF without an image page")
        if values and page.ndim == 2 and page.dtype.kind in "iu" and page.dtype.itemsize <= 4:
            return Image.fromarray(page if page.dtype.itemsize in (1, 2) else page.astype(np.int32))
        return array_image(page)
    return Image.open(io.BytesIO(data))


def exif_orientation(img: Image.Image) -> int:
    """The EXIF orientation of an opened image, 1 (as stored) when absent or invalid."""
    try:
        value = int(img.getexif().get(_EXIF_ORIENTATION, 1))
    except Exception:  # a damaged EXIF block: take the pixels as stored
        return 1
    return value if 1 <= value <= 8 else 1


def orient(img: Image.Image, orientation: int) -> Image.Image:
    """``img`` (decoded) turned and mirrored as EXIF ``orientation`` says; unchanged for 1."""
    if orientation == 1:
        return img
    return img.transpose(_TRANSPOSE[orientation])


_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


def swaps_sides(orientation: int) -> bool:
    """Whether turning by ``orientation`` swaps width and height."""
    return orientation in _SWAPS


def read_image(path: str | os.PathLike, exif_transpose: bool = True, values: bool = False) -> Image.Image:
    """A file decoded in full (TIFFs through tifffile; ``values`` as :func:`open_image`), turned
    upright when ``exif_transpose``.

    Raises:
        Exception: what PIL or tifffile raise for a file they cannot read.
    """
    with open(path, "rb") as fh:
        data = fh.read()
    img = open_image(data, values)
    img.load()
    return orient(img, exif_orientation(img)) if exif_transpose else img


def decoded_size(path: str | os.PathLike, exif_transpose: bool = True) -> tuple[int, int]:
    """``(width, height)`` of a file after decoding all of its data, upright when ``exif_transpose``.

    A JPEG is decoded with DCT scaling (every entropy-coded block is still read, so damage
    and truncation fail here exactly as in a full decode, at a fraction of the cost).

    Raises:
        Exception: what PIL or tifffile raise for a file they cannot decode.
    """
    with open(path, "rb") as fh:
        data = fh.read()
    img = open_image(data)
    size = img.size
    turn = exif_orientation(img) if exif_transpose else 1
    if img.format == "JPEG":
        img.draft(img.mode, (max(1, size[0] // 8), max(1, size[1] // 8)))
    img.load()
    return size[::-1] if swaps_sides(turn) else size


def read_rgb(path: str | os.PathLike, exif_transpose: bool = True) -> Image.Image:
    """:func:`read_image` as 8-bit RGB (:func:`to_rgb`)."""
    return to_rgb(read_image(path, exif_transpose))
