"""Image signatures: decoded-pixel sha256, 64-bit DCT perceptual hash, 16 x 16 thumbnail.

One concept: the small fingerprints that say two images hold the same picture. The
shard stage computes them for every stored sample from the image it has just decoded
(index columns :data:`~dataeff.constants.SIGNATURE_KEYS`); the leakage guard
(:mod:`dataeff.overlap`) computes them for downstream images with the same functions
and compares; MedDEL can use them to recognise copies inside a cluster.

- ``pixel_sha256``: sha256 of the 8-bit RGB pixels, prefixed by the size, so a PNG and
  its lossless re-save, or two JPEG files holding the same pixels, agree;
- ``phash``: grayscale thumbnail (:func:`gray_base`) -> 32 x 32 (bilinear, antialiased)
  -> orthonormal 2-D DCT-II -> top-left 8 x 8 -> bit = coefficient > median of the 63
  non-DC coefficients; near for resizes, re-encodes and brightness changes;
- ``thumb``: the same grayscale thumbnail -> 16 x 16 (bilinear, antialiased); the Pearson
  correlation of two thumbnails confirms a pHash candidate (the hash alone is not enough
  on endoscopy: frames share the black border and vignetting; docs/overlap.md).

Both small images are taken from the 128-px grayscale thumbnail the shard stage's
quality statistics use, not from the full image: an antialiased resize of the full
image costs ~0.3 ms per target at 320 px (more for large frames), from the thumbnail
~0.01 ms, and the low frequencies a 32-px image keeps are the same.

Pure functions of a PIL image or of arrays; no I/O.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from functools import lru_cache
from typing import TypedDict

import numpy as np
from PIL import Image

#: Long side of the grayscale thumbnail every signature (and the shard-time quality
#: statistics) is computed from; smaller images are used as they are.
GRAY_SIDE = 128
#: Side of the grayscale image the DCT is taken of (the classic pHash recipe).
PHASH_SIZE = 32
#: Side of the low-frequency DCT block kept: 8 x 8 = 64 bits.
PHASH_LOW = 8
#: Default pHash threshold, bits out of 64. Measured on the 1000 Kvasir-SEG images
#: (docs/overlap.md): copies resized to 0.3-0.7x, re-encoded as JPEG q30-q60 or
#: brightened are at most 8 bits from their original (at 48 px; 4 at full size), but
#: 0.2% of pairs of different images are also within 10 bits, hence the confirmation.
PHASH_MAX_DISTANCE = 10
#: Side of the grayscale thumbnail that confirms a pHash candidate.
THUMB_SIZE = 16
#: Default confirmation threshold: Pearson correlation of the two thumbnails. Copies
#: score >= 0.998; different Kvasir-SEG scenes at most 0.979 (docs/overlap.md).
MIN_THUMB_CORR = 0.99


class Signature(TypedDict):
    """One image's index signature columns (:data:`~dataeff.constants.SIGNATURE_KEYS`)."""

    pixel_sha256: str | None  #: hex; None when the full-size pixels were not decoded
    phash: int  #: the 64 hash bits as a signed int64 (parquet and pandas have no uint64 column)
    thumb: bytes  #: THUMB_SIZE**2 uint8, row-major


_POPCOUNT8 = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)


# --------------------------------------------------------------------------- per image


def pixel_sha256(image: Image.Image) -> str:
    """sha256 of an image's decoded 8-bit RGB pixels, prefixed by its size.

    Two files match when they decode to the same pixels, whatever their format or
    metadata (a PNG and its lossless re-save, a JPEG copied byte for byte).
    """
    rgb = image if image.mode == "RGB" else image.convert("RGB")
    h = hashlib.sha256(f"{rgb.width}x{rgb.height}:".encode())
    # Row-major RGB bytes, the same as np.asarray(rgb).tobytes(), a block of ~4 MB at a time:
    # tobytes of a whole large image holds its pixels twice (chunks, then their join).
    rows = max(1, (1 << 22) // max(3 * rgb.width, 1))
    for top in range(0, rgb.height, rows):
        h.update(rgb.crop((0, top, rgb.width, min(top + rows, rgb.height))).tobytes())
    return h.hexdigest()


def dct_matrix(n: int) -> np.ndarray:
    """Orthonormal DCT-II matrix: ``dct_matrix(n) @ x`` is ``scipy.fft.dct(x, norm="ortho")``.

    Shape:
        -> (n, n) float64.
    """
    k = np.arange(n)[:, None]
    i = np.arange(n)[None, :]
    m = np.cos(np.pi * (2 * i + 1) * k / (2 * n)) * np.sqrt(2.0 / n)
    m[0] /= np.sqrt(2.0)
    return m


def dct2(x: np.ndarray) -> np.ndarray:
    """Orthonormal 2-D DCT-II (matrix form).

    Shape:
        x: (n, n) -> (n, n) float64.
    """
    x = np.asarray(x, dtype=np.float64)
    m = dct_matrix(x.shape[0])
    return m @ x @ m.T


@lru_cache(maxsize=1)
def _low_rows() -> np.ndarray:
    """The first :data:`PHASH_LOW` rows of the DCT matrix: the low block without the full transform."""
    return dct_matrix(PHASH_SIZE)[:PHASH_LOW].copy()


def gray_base(image: Image.Image, side: int = GRAY_SIDE) -> Image.Image:
    """Grayscale thumbnail whose long side is at most ``side`` (smaller images are kept as they are).

    Idempotent: the thumbnail of a thumbnail is itself, so a caller holding it can pass
    it to :func:`phash_bits` / :func:`thumbnail` instead of the full image.
    """
    gray = image if image.mode == "L" else image.convert("L")
    w, h = gray.size
    if max(w, h) <= side:
        return gray
    scale = side / max(w, h)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    # reducing_gap: box-average by an integer factor first, then a short bilinear step
    return gray.resize(size, Image.Resampling.BILINEAR, reducing_gap=2.0)


def gray_thumbnail(image: Image.Image, side: int = GRAY_SIDE) -> np.ndarray:
    """:func:`gray_base` as an array (the input of the shard-time quality statistics).

    Shape:
        -> (h, w) uint8, max(h, w) <= side.
    """
    return np.asarray(gray_base(image, side))


def phash_bits(image: Image.Image) -> np.ndarray:
    """64-bit DCT perceptual hash as bits.

    Grayscale thumbnail (:func:`gray_base`), resize to 32 x 32 (bilinear, antialiased), 2-D DCT, keep the top-left
    8 x 8 low frequencies; bit = coefficient > median of the 63 non-DC coefficients
    (the DC term only measures brightness and would dominate the median). The low block
    is computed directly as ``D[:8] @ x @ D[:8].T`` (the top-left of :func:`dct2`), one
    code path for every caller, so the shard stage and the leakage guard get the same bits.

    Shape:
        -> (64,) bool, row-major over the 8 x 8 block.
    """
    gray = gray_base(image).resize((PHASH_SIZE, PHASH_SIZE), Image.Resampling.BILINEAR)
    d = _low_rows()
    low = (d @ np.asarray(gray, dtype=np.float64) @ d.T).ravel()
    # Median of the 63 AC terms = their 32nd smallest (np.median's value, at a third of its cost).
    return low > np.partition(low[1:], 31)[31]


def thumbnail(image: Image.Image) -> np.ndarray:
    """Grayscale thumbnail that confirms pHash candidates (:func:`gray_base`, then antialiased bilinear).

    Shape:
        -> (THUMB_SIZE, THUMB_SIZE) uint8.
    """
    gray = gray_base(image).resize((THUMB_SIZE, THUMB_SIZE), Image.Resampling.BILINEAR)
    return np.asarray(gray, dtype=np.uint8)


def image_signature(image: Image.Image, base: Image.Image | None = None, pixel_hash: bool = True) -> Signature:
    """The index signature columns of one image (what ``dataeff shard`` stores per sample).

    Args:
        image: the decoded image (converted to RGB for the pixel hash).
        base: ``gray_base(image)`` when the caller already has it (the shard stage does).
        pixel_hash: False when ``image`` is not the full-size decode (a JPEG decoded with
            DCT scaling): its pixel hash would match nothing, so it is left out (None).

    Returns:
        ``{"pixel_sha256": hex str or None, "phash": int (the 64 hash bits as a signed int64),
        "thumb": bytes (THUMB_SIZE**2 uint8, row-major)}``.
    """
    base = gray_base(image) if base is None else base  # once, for the hash and the thumbnail
    return {
        "pixel_sha256": pixel_sha256(image) if pixel_hash else None,
        "phash": int(pack_phash(phash_bits(base)).view(np.int64)[0]),
        "thumb": thumbnail(base).tobytes(),
    }


# --------------------------------------------------------------------------- arrays


def thumb_corr(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pearson correlation of paired thumbnails (invariant to brightness and contrast).

    A constant thumbnail (blank frame) correlates 0 with everything.

    Shape:
        a, b: (K, S, S) or (K, S*S) -> (K,) float32.
    """
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    # Explicit widths: reshape(0, -1) is ambiguous when no pair is a candidate.
    x = a.reshape(len(a), int(np.prod(a.shape[1:])))
    y = b.reshape(len(b), int(np.prod(b.shape[1:])))
    x = x - x.mean(axis=1, keepdims=True)
    y = y - y.mean(axis=1, keepdims=True)
    den = np.linalg.norm(x, axis=1) * np.linalg.norm(y, axis=1)
    return np.where(den > 0, (x * y).sum(axis=1) / np.maximum(den, 1e-12), 0.0).astype(np.float32)


def pack_phash(bits: np.ndarray) -> np.ndarray:
    """Pack hash bits into one unsigned 64-bit integer per row (first bit = most significant).

    Shape:
        bits: (N, 64) or (64,) bool -> (N,) uint64.
    """
    bits = np.atleast_2d(np.asarray(bits, dtype=bool))
    if bits.shape[1] != 64:
        raise ValueError(f"pack_phash: expected 64 bits per row, got {bits.shape[1]}")
    return np.packbits(bits, axis=1).view(">u8").ravel().astype(np.uint64)


def popcount64(x: np.ndarray) -> np.ndarray:
    """Number of set bits of each uint64 (``np.bitwise_count`` on numpy >= 2).

    Shape:
        x: (...) uint64 -> (...) uint8.
    """
    x = np.asarray(x, dtype=np.uint64)
    if hasattr(np, "bitwise_count"):
        return np.bitwise_count(x)
    return _POPCOUNT8[x[..., None].view(np.uint8)].sum(axis=-1, dtype=np.uint8)


def hamming(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Hamming distances between every packed hash of ``a`` and every one of ``b``.

    Shape:
        a: (N,) uint64, b: (M,) uint64 -> (N, M) uint8.
    """
    return popcount64(np.asarray(a, np.uint64)[:, None] ^ np.asarray(b, np.uint64)[None, :])


def index_signatures(
    pixel_sha: Sequence[str | None], phash: Sequence[int | None], thumb: Sequence[bytes | None]
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Index signature columns as arrays; rows without a signature (null) are flagged.

    A row has a signature when its thumbnail is not null (the shard index stores ``phash``
    0, never null, on rows without one). A row without gets an empty pixel hash (never
    equal to anything), hash 0 and a constant thumbnail (correlation 0 with everything),
    so no search matches it.

    Shape:
        N values each -> pixel_sha (N,) str, phash (N,) uint64, thumbs (N, S, S) uint8, has (N,) bool.
    """
    has = np.array([t is not None for t in thumb], dtype=bool)
    size = THUMB_SIZE * THUMB_SIZE
    sha = np.array([s or "" for s in pixel_sha], dtype=str).reshape(-1)
    hashes = np.array([int(p) if ok and p is not None else 0 for p, ok in zip(phash, has, strict=True)], np.int64)
    blank = bytes(size)
    parts = [bytes(t) if ok and t is not None else blank for t, ok in zip(thumb, has, strict=True)]
    bad = [len(p) for p in parts if len(p) != size]
    if bad:
        raise ValueError(f"index_signatures: a thumbnail has {bad[0]} bytes, expected {size}")
    thumbs = np.frombuffer(b"".join(parts), dtype=np.uint8).reshape(len(has), THUMB_SIZE, THUMB_SIZE).copy()
    return sha, hashes.view(np.uint64), thumbs, has
