"""PNG contact sheets of a selection: what was removed and why, a few clusters, OptiDEL's patches.

``pick_*`` functions are pure (manifest table in, keys out); the ``write_*`` functions
read the chosen images from the shards and draw the sheets with PIL, one style for
every method: each tile has a caption, kept samples a green frame, dropped ones a red
frame, other pictures a grey one. Galleries are for people, not part of the manifest.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw

from dataeff.config import option
from dataeff.constants import EMBEDDING_REASONS, GENERATED_DIR, KEPT, QUALITY_REASONS, REDUNDANT_PREFIX
from dataeff.data.stream import iter_shard
from dataeff.files import write_atomic
from dataeff.select.compose import crop_patch
from dataeff.select.mosaic_shards import Records, read_crops

GALLERY_DIR = "gallery"
TILE = 112
CAPTION = 14
PER_ROW = 6
KEPT_COLOUR, DROPPED_COLOUR, NEUTRAL_COLOUR = (40, 170, 60), (210, 40, 40), (160, 160, 160)
#: SAM boxes on a source image: selected patches red, the others yellow.
SELECTED_BOX, OTHER_BOX = (230, 30, 30), (240, 220, 0)
#: Side of a patch thumbnail before it is fitted into its tile, px.
PATCH_SIDE = 96


@dataclass
class GalleryConfig:
    """Contact sheets written beside the manifest (``<out>/gallery/*.png``)."""

    gallery: bool = option(
        False, help="write PNG contact sheets of removed samples, a few clusters and (optidel) patches and mosaics"
    )
    per_sheet: int = option(12, help="examples per contact sheet")
    clusters: int = option(4, help="clusters shown with kept vs dropped members")


# --------------------------------------------------------------------------- picking (pure)


def _sample(keys: list[str], n: int, seed: int) -> list[str]:
    if len(keys) <= n:
        return keys
    return sorted(np.random.default_rng(seed).choice(keys, size=n, replace=False).tolist())


def pick_removed(frame: pd.DataFrame, reasons: Sequence[str], n: int, seed: int) -> list[str]:
    """Up to ``n`` dropped keys whose reason is one of ``reasons`` (seeded sample)."""
    return _sample(frame.loc[frame["reason"].isin(reasons), "key"].tolist(), n, seed)


def pick_redundant_pairs(frame: pd.DataFrame, n: int, seed: int) -> list[tuple[str, str]]:
    """Up to ``n`` (removed, twin) pairs, preferring twins that were kept."""
    red = frame[frame["reason"].str.startswith(REDUNDANT_PREFIX)]
    twins = red["reason"].str.slice(len(REDUNDANT_PREFIX))
    kept = set(frame.loc[frame["kept"], "key"])
    pairs = list(zip(red["key"], twins, strict=False))
    first = [p for p in pairs if p[1] in kept] or pairs
    chosen = _sample([f"{a}\t{b}" for a, b in first], n, seed)
    return [(a, b) for a, b in (c.split("\t") for c in chosen)]


def pick_clusters(
    frame: pd.DataFrame, n_clusters: int, per_side: int, seed: int
) -> list[tuple[int, list[str], list[str]]]:
    """The largest clusters with (kept, dropped) sample keys of each."""
    pool = frame[(frame["cluster"] >= 0) & ~frame["generated"]]
    sizes = pool.groupby("cluster").size().sort_values(ascending=False, kind="stable")
    out = []
    for c in sizes.index[:n_clusters]:
        members = pool[pool["cluster"] == c]
        out.append(
            (
                int(c),
                _sample(members.loc[members["kept"], "key"].tolist(), per_side, seed),
                _sample(members.loc[~members["kept"], "key"].tolist(), per_side, seed),
            )
        )
    return out


def hardness_extremes(scores: np.ndarray, count: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows of the ``count`` hardest and the ``count`` easiest patches (ties: lower row first for the hardest).

    Shape:
        scores: (P,) -> hardest (min(count, P),) int64, easiest (min(count, P),) int64.
    """
    order = np.argsort(-scores, kind="stable")
    return order[:count], order[::-1][:count]


# --------------------------------------------------------------------------- drawing


def load_images(keys: set[str], index: pd.DataFrame) -> dict[str, Image.Image]:
    """The images of ``keys`` from their shards (index columns key, status, shard, shard_dir)."""
    rows = index[index["key"].isin(keys) & (index["status"] == "ok")]
    out = {}
    for (d, shard), sub in rows.groupby(["shard_dir", "shard"]):
        for s in iter_shard(str(Path(d) / shard), set(sub["key"])):
            out[s["key"]] = s["image"]
    return out


def _tile(img: Image.Image | None, caption: str, colour: tuple[int, int, int]) -> Image.Image:
    tile = Image.new("RGB", (TILE, TILE + CAPTION), (255, 255, 255))
    if img is not None:
        scale = (TILE - 6) / max(img.size)  # up or down: tiny fixture images stay legible
        thumb = img.resize(
            (max(1, round(img.width * scale)), max(1, round(img.height * scale))), Image.Resampling.BICUBIC
        )
        tile.paste(thumb, ((TILE - thumb.width) // 2, (TILE - thumb.height) // 2))
    draw = ImageDraw.Draw(tile)
    draw.rectangle([0, 0, TILE - 1, TILE - 1], outline=colour, width=3)
    draw.text((3, TILE + 1), caption[:18], fill=(0, 0, 0))
    return tile


def _sheet(title: str, rows: list[list[Image.Image]]) -> Image.Image:
    cols = max((len(r) for r in rows), default=1)
    sheet = Image.new(
        "RGB", (max(cols * TILE, 6 * len(title) + 8), 20 + max(len(rows), 1) * (TILE + CAPTION)), (255, 255, 255)
    )
    ImageDraw.Draw(sheet).text((4, 4), title, fill=(0, 0, 0))
    for i, row in enumerate(rows):
        for j, tile in enumerate(row):
            sheet.paste(tile, (j * TILE, 20 + i * (TILE + CAPTION)))
    return sheet


def _in_rows(tiles: list[Image.Image]) -> list[list[Image.Image]]:
    return [tiles[i : i + PER_ROW] for i in range(0, len(tiles), PER_ROW)] or [[]]


def _save_sheets(folder: Path, sheets: dict[str, tuple[str, list[list[Image.Image]]]]) -> list[Path]:
    written = []
    for name, (title, rows) in sheets.items():
        sheet = _sheet(title, rows)
        write_atomic(folder / name, sheet.save, keep_suffix=True)  # PIL picks PNG from the suffix
        written.append(folder / name)
    return written


def write_gallery(
    out_dir: str | os.PathLike, frame: pd.DataFrame, index: pd.DataFrame, cfg: GalleryConfig, seed: int
) -> list[Path]:
    """Write the removed-sample and cluster sheets into ``<out_dir>/gallery/``; returns the written paths."""
    n = cfg.per_sheet
    quality = pick_removed(frame, QUALITY_REASONS, n, seed)
    outliers = pick_removed(frame, EMBEDDING_REASONS, n, seed)
    pairs = pick_redundant_pairs(frame, n // 2 or 1, seed)
    clusters = pick_clusters(frame, cfg.clusters, PER_ROW // 2, seed)
    wanted = set(quality) | set(outliers) | {k for p in pairs for k in p} | {k for _, a, b in clusters for k in a + b}
    images = load_images(wanted, index)
    info = frame.set_index("key")

    def tile(key: str) -> Image.Image:
        kept = bool(info.at[key, "kept"])
        reason = str(info.at[key, "reason"])
        caption = KEPT if kept else ("redundant" if reason.startswith(REDUNDANT_PREFIX) else reason)
        return _tile(images.get(key), caption, KEPT_COLOUR if kept else DROPPED_COLOUR)

    sheets = {
        "removed_low_quality.png": (
            "removed: low quality (dark / blank / overexposed / blurred)",
            _in_rows([tile(k) for k in quality]),
        ),
        "removed_outliers.png": (
            "removed: embedding outliers and small clusters",
            _in_rows([tile(k) for k in outliers]),
        ),
        "removed_redundant.png": (
            "removed near-duplicate (left) beside the sample it duplicates (right)",
            [[tile(a), tile(b)] for a, b in pairs] or [[]],
        ),
        "clusters.png": (
            "largest clusters: kept (green) vs dropped (red), one row per cluster",
            [[tile(k) for k in a + b] for _, a, b in clusters] or [[]],
        ),
    }
    return _save_sheets(Path(out_dir) / GALLERY_DIR, sheets)


def _with_boxes(image: np.ndarray, boxes: np.ndarray, selected: np.ndarray) -> Image.Image:
    picture = Image.fromarray(image, "RGB")
    draw = ImageDraw.Draw(picture)
    for (x0, y0, x1, y1), chosen in zip(boxes.tolist(), selected.tolist(), strict=True):
        # Boxes are end-exclusive; PIL's rectangle includes its last pixel.
        draw.rectangle([x0, y0, x1 - 1, y1 - 1], outline=SELECTED_BOX if chosen else OTHER_BOX, width=1)
    return picture


def write_optidel_gallery(
    out_dir: str | os.PathLike,
    rec: Records,
    selected: np.ndarray,
    groups: np.ndarray,
    mosaic_keys: Sequence[str],
    tar_of: dict[str, str],
    count: int,
) -> list[Path]:
    """OptiDEL sheets in ``<out_dir>/gallery/``: sources with their SAM boxes, hardest/easiest patches, mosaics.

    Args:
        rec: the patch records (source, box, score, ...), one row per patch.
        mosaic_keys: key of each mosaic, in mosaic order (its pixels are read back from
            ``<out_dir>/generated``).
        tar_of: pool key -> tar path of its image.
        count: examples per sheet.

    Shape:
        selected: (P,) bool; groups: (M, 4) rows of ``rec`` per mosaic.
    """
    out = Path(out_dir)
    hard, easy = hardness_extremes(rec["score"], count)
    sources = list(dict.fromkeys(str(rec["source"][r]) for r in groups.ravel()))[:count]
    rows_of = {s: np.flatnonzero(rec["source"] == s) for s in sources}
    needed: dict[str, set[tuple[int, ...]]] = {}
    for r in np.concatenate([hard, easy]):
        needed.setdefault(str(rec["source"][r]), set()).add(tuple(int(v) for v in rec["box"][r]))
    crops, _ = read_crops(needed, tar_of)
    full: dict[str, np.ndarray] = {}
    for s in sources:
        for sample in iter_shard(tar_of[s], {s}):
            full[s] = np.asarray(sample["image"], dtype=np.uint8)

    def patch_tile(r: int) -> Image.Image:
        crop = crops[(str(rec["source"][r]), tuple(int(v) for v in rec["box"][r]))]
        thumb = crop_patch(crop, (0, 0, crop.shape[1], crop.shape[0]), PATCH_SIDE)
        return _tile(Image.fromarray(thumb, "RGB"), f"score {rec['score'][r]:.4f}", NEUTRAL_COLOUR)

    wanted = set(mosaic_keys[: min(count, len(groups))])
    mosaics: list[Image.Image] = []
    for tar in sorted((out / GENERATED_DIR).glob("mosaic-*.tar")):
        if len(mosaics) >= len(wanted):
            break
        mosaics += [_tile(s["image"], s["key"].rsplit("_", 1)[-1], KEPT_COLOUR) for s in iter_shard(str(tar), wanted)]
    source_tiles = [
        _tile(
            _with_boxes(full[s], rec["box"][rows_of[s]], selected[rows_of[s]]),
            f"{s[:12]} {len(rows_of[s])} box",
            NEUTRAL_COLOUR,
        )
        for s in sources
    ]
    sheets = {
        "sources_sam_boxes.png": ("sources: SAM boxes, selected (red) and not (yellow)", _in_rows(source_tiles)),
        "hardest_patches.png": ("hardest patches (highest MAE loss)", _in_rows([patch_tile(r) for r in hard])),
        "easiest_patches.png": ("easiest patches (lowest MAE loss)", _in_rows([patch_tile(r) for r in easy])),
        "mosaics.png": ("generated mosaics (2x2 hard patches)", _in_rows(mosaics)),
    }
    # As before: a sheet with nothing to show is not written.
    return _save_sheets(out / GALLERY_DIR, {k: v for k, v in sheets.items() if v[1] != [[]]})
