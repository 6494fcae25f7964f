"""Pure image operations of OptiDEL: crop a SAM box into a patch, tile 4 patches into a mosaic.

OptiDEL (PAPERS.md, step 4) turns every M = 4 selected hard patches into one new
pre-training image at the original resolution, a 2x2 mosaic. Both operations here are
deterministic functions of their inputs (PIL bilinear resampling), so a mosaic is a
pure function of its four (source image, box) pairs and its size.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image

#: Patches per mosaic (2x2 tiling, PAPERS.md: M = 4).
PATCHES_PER_MOSAIC = 4


def crop_patch(image: np.ndarray, box: Sequence[int], size: int | tuple[int, int]) -> np.ndarray:
    """Crop ``box`` out of ``image`` and resize it to ``size`` (a side, or ``(width, height)``).

    Args:
        image: RGB image.
        box: ``(x0, y0, x1, y1)`` in pixels, end-exclusive, inside the image.
        size: output side (square) or ``(width, height)``, px.

    Shape:
        image: (H, W, 3) uint8 -> (height, width, 3) uint8.
    """
    x0, y0, x1, y1 = (int(v) for v in box)
    h, w = image.shape[:2]
    if not (0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h):
        raise ValueError(f"box {tuple(box)} is empty or outside the {w}x{h} image")
    out_w, out_h = (size, size) if isinstance(size, (int, np.integer)) else size
    crop = Image.fromarray(np.ascontiguousarray(image[y0:y1, x0:x1]), "RGB")
    return np.asarray(crop.resize((int(out_w), int(out_h)), Image.Resampling.BILINEAR), dtype=np.uint8)


def quadrant_boxes(width: int, height: int) -> list[tuple[int, int, int, int]]:
    """The 4 quadrants of a ``width`` x ``height`` mosaic: top-left, top-right, bottom-left, bottom-right.

    Odd sides give the right column / bottom row the extra pixel, so the mosaic has
    exactly the requested size.
    """
    w2, h2 = width // 2, height // 2
    return [(0, 0, w2, h2), (w2, 0, width, h2), (0, h2, w2, height), (w2, h2, width, height)]


def compose_mosaic(crops: Sequence[tuple[np.ndarray, Sequence[int]]], width: int, height: int) -> np.ndarray:
    """Tile 4 source crops into one ``width`` x ``height`` 2x2 mosaic.

    Each ``(image, box)`` is cropped and resized to its quadrant (:func:`quadrant_boxes`),
    i.e. to half the mosaic's size per side (PAPERS.md: patches at half the image size).

    Shape:
        crops: 4 x ((H_i, W_i, 3) uint8, box) -> (height, width, 3) uint8.
    """
    if len(crops) != PATCHES_PER_MOSAIC:
        raise ValueError(f"a mosaic takes {PATCHES_PER_MOSAIC} crops, got {len(crops)}")
    if width < 2 or height < 2:
        raise ValueError(f"mosaic size {width}x{height}: both sides must be at least 2 px")
    mosaic = np.zeros((height, width, 3), dtype=np.uint8)
    for (image, box), (x0, y0, x1, y1) in zip(crops, quadrant_boxes(width, height), strict=False):
        mosaic[y0:y1, x0:x1] = crop_patch(image, box, (x1 - x0, y1 - y0))
    return mosaic


def quadrant(mosaic: np.ndarray, index: int) -> np.ndarray:
    """Quadrant ``index`` (0..3, order of :func:`quadrant_boxes`) of a mosaic.

    Shape:
        mosaic: (H, W, 3) -> (h_i, w_i, 3).
    """
    x0, y0, x1, y1 = quadrant_boxes(mosaic.shape[1], mosaic.shape[0])[index]
    return mosaic[y0:y1, x0:x1]
