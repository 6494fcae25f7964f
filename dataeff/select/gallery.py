"""PNG contact sheets of a selection: what was removed and why, a few clusters, OptiDEL's patches.

``pick_*`` functions are pure (manifest table in, keys out); the ``write_*`` functions
read the chosen images from the shards and draw the sheets with PIL, one style for
every method: each tile has a caption, kept samples a green frame, dropped ones a red
frame, other pictures a grey one. Galleries are for people, not part of the manifest.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw

from dataeff.config import ConfigError, option
from dataeff.constants import (
    DOWNSTREAM_OVERLAP,
    EMBEDDING_REASONS,
    GENERATED_DIR,
    KEPT,
    QUALITY_KEYS,
    QUALITY_REASONS,
    REDUNDANT_PREFIX,
)
from dataeff.data import remote
from dataeff.data.stream import iter_shard
from dataeff.files import write_atomic
from dataeff.select.compose import crop_patch
from dataeff.select.meddel import MedDELConfig
from dataeff.select.mosaic_shards import Records, read_crops

GALLERY_DIR = "gallery"
TILE = 112
#: Caption strip under a tile: two lines of PIL's default font.
CAPTION = 26
CAPTION_CHARS = 18
PER_ROW = 6
KEPT_COLOUR, DROPPED_COLOUR, NEUTRAL_COLOUR = (40, 170, 60), (210, 40, 40), (160, 160, 160)
#: SAM boxes on a source image: selected patches red, the others yellow.
SELECTED_BOX, OTHER_BOX = (230, 30, 30), (240, 220, 0)
#: Side of a patch thumbnail before it is fitted into its tile, px.
PATCH_SIDE = 96
#: Tiles per row of the mosaic sheet: the mosaic, then its 4 sources.
MOSAIC_ROW = 5


@dataclass
class GalleryConfig:
    """Contact sheets written beside the manifest (``<out>/gallery/*.png``)."""

    gallery: bool = option(
        False, help="write PNG contact sheets of removed samples, a few clusters and (optidel) patches and mosaics"
    )
    per_sheet: int = option(12, help="tiles per contact sheet (at most; sheets stay small)")
    clusters: int = option(3, help="clusters shown with kept vs dropped members (per_sheet tiles shared among them)")

    def __post_init__(self) -> None:
        if self.per_sheet < 1 or self.clusters < 1:
            raise ConfigError("report.per_sheet and report.clusters must be at least 1")


# --------------------------------------------------------------------------- picking (pure)


def _sample(keys: list[str], n: int, seed: int) -> list[str]:
    if len(keys) <= n:
        return keys
    return sorted(np.random.default_rng(seed).choice(keys, size=n, replace=False).tolist())


def pick_removed(frame: pd.DataFrame, reasons: Sequence[str], n: int, seed: int) -> list[str]:
    """Up to ``n`` dropped keys whose reason is one of ``reasons`` (seeded sample)."""
    return _sample(frame.loc[frame["reason"].isin(reasons), "key"].tolist(), n, seed)


def pick_per_reason(frame: pd.DataFrame, reasons: Sequence[str], n: int, seed: int) -> dict[str, list[str]]:
    """Up to ``n`` keys in all, shared evenly by the ``reasons`` that occur (at least one each, in order)."""
    present = [r for r in reasons if (frame["reason"] == r).any()]
    if not present:
        return {}
    each = max(1, n // len(present))
    return {r: pick_removed(frame, [r], each, seed) for r in present}


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


def pair_similarity(keys: np.ndarray, emb: np.ndarray, pairs: Sequence[tuple[str, str]]) -> list[float]:
    """Cosine similarity of each (removed, twin) pair's embeddings (the number MedDEL/SemDeDup compared).

    Shape:
        keys: (N,) sorted, emb: (N, D) unit rows -> one float per pair (NaN when a key is unknown).
    """
    out = []
    for a, b in pairs:
        i, j = np.searchsorted(keys, [a, b])
        if i < len(keys) and j < len(keys) and keys[i] == a and keys[j] == b:
            out.append(float(np.dot(emb[i].astype(np.float32), emb[j].astype(np.float32))))
        else:
            out.append(float("nan"))
    return out


def tripped_statistic(reason: str, stats: Mapping[str, float], cfg: MedDELConfig) -> str:
    """The shard-time statistic that made a frame invalid, against its threshold (e.g. ``mean 12<25``).

    Args:
        reason: a quality reason (dark, overexposed, blank, blurred).
        stats: the frame's quality statistics (index columns mean, std, laplacian_var, dark_frac, bright_frac).
        cfg: the thresholds (``meddel.*``, which OptiDEL uses too).
    """
    if reason == "dark":
        if stats["mean"] < cfg.dark_mean:
            return f"mean {stats['mean']:.0f}<{cfg.dark_mean:g}"
        return f"dark px {stats['dark_frac']:.2f}>{cfg.dark_frac:g}"
    if reason == "overexposed":
        if stats["mean"] > cfg.overexposed_mean:
            return f"mean {stats['mean']:.0f}>{cfg.overexposed_mean:g}"
        return f"bright px {stats['bright_frac']:.2f}>{cfg.overexposed_frac:g}"
    if reason == "blank":
        return f"std {stats['std']:.1f}<{cfg.blank_std:g}"
    if reason == "blurred":
        return f"lap var {stats['laplacian_var']:.0f}<{cfg.blur_var:g}"
    return ""


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
        for s in iter_shard(remote.join(d, shard), set(sub["key"])):
            out[s["key"]] = s["image"]
    return out


def _tile(img: Image.Image | None, caption: str, colour: tuple[int, int, int]) -> Image.Image:
    """One tile: the picture fitted into TILE px, a coloured frame, up to two caption lines ('\\n')."""
    tile = Image.new("RGB", (TILE, TILE + CAPTION), (255, 255, 255))
    if img is not None:
        scale = (TILE - 6) / max(img.size)  # up or down: tiny fixture images stay legible
        thumb = img.resize(
            (max(1, round(img.width * scale)), max(1, round(img.height * scale))), Image.Resampling.BICUBIC
        )
        tile.paste(thumb, ((TILE - thumb.width) // 2, (TILE - thumb.height) // 2))
    draw = ImageDraw.Draw(tile)
    draw.rectangle([0, 0, TILE - 1, TILE - 1], outline=colour, width=3)
    for i, line in enumerate(caption.split("\n")[:2]):
        draw.text((3, TILE + 1 + 12 * i), line[:CAPTION_CHARS], fill=(0, 0, 0))
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


def _in_rows(tiles: list[Image.Image], per_row: int = PER_ROW) -> list[list[Image.Image]]:
    return [tiles[i : i + per_row] for i in range(0, len(tiles), per_row)] or [[]]


def _save_sheets(folder: Path, sheets: dict[str, tuple[str, list[list[Image.Image]]]]) -> list[Path]:
    """Write each sheet that has something to show (an empty one is not written)."""
    written = []
    for name, (title, rows) in sheets.items():
        if not any(rows):
            continue
        sheet = _sheet(title, rows)
        write_atomic(folder / name, sheet.save, keep_suffix=True)  # PIL picks PNG from the suffix
        written.append(folder / name)
    return written


def write_gallery(
    out_dir: str | os.PathLike,
    frame: pd.DataFrame,
    index: pd.DataFrame,
    cfg: GalleryConfig,
    seed: int,
    keys: np.ndarray,
    emb: np.ndarray,
    quality_cfg: MedDELConfig,
    matched: Mapping[str, str],
) -> list[Path]:
    """Removed-sample and cluster sheets in ``<out_dir>/gallery/``; returns the written paths.

    Sheets (each at most ``cfg.per_sheet`` tiles; a sheet with nothing to show is not written):
    ``removed_low_quality.png`` (one row per quality reason, captioned with the statistic
    that tripped), ``removed_outliers.png`` (with the cosine distance to the centroid),
    ``removed_redundant.png`` (each removed sample beside the one it duplicates, with
    their cosine similarity), ``removed_downstream_overlap.png`` (pool samples excluded
    as copies of a downstream image, captioned with that image; the overlap stage draws
    the pairs) and ``clusters.png`` (kept vs dropped members of the largest clusters).

    Args:
        keys, emb: the pool's sorted keys and embeddings (similarity of redundant pairs).
        quality_cfg: the invalid-frame thresholds (``meddel.*``).
        matched: excluded pool key -> the downstream ``dataset/file`` it copies.

    Shape:
        keys: (N,), emb: (N, D).
    """
    n = cfg.per_sheet
    quality = pick_per_reason(frame, QUALITY_REASONS, n, seed)
    outliers = pick_per_reason(frame, EMBEDDING_REASONS, n, seed)
    overlap = pick_removed(frame, [DOWNSTREAM_OVERLAP], n, seed)
    pairs = pick_redundant_pairs(frame, max(1, n // 2), seed)
    sims = pair_similarity(keys, emb, pairs)
    clusters = pick_clusters(frame, cfg.clusters, max(1, n // (2 * cfg.clusters)), seed)
    wanted = {k for ks in [*quality.values(), *outliers.values(), overlap] for k in ks}
    wanted |= {k for p in pairs for k in p} | {k for _, a, b in clusters for k in a + b}
    images = load_images(wanted, index)
    info = frame.set_index("key")
    stats = index[index["status"] == "ok"].drop_duplicates("key").set_index("key")

    def tile(key: str, detail: str = "") -> Image.Image:
        kept = bool(info.at[key, "kept"])
        reason = str(info.at[key, "reason"])
        caption = KEPT if kept else ("redundant" if reason.startswith(REDUNDANT_PREFIX) else reason)
        return _tile(
            images.get(key), f"{caption}\n{detail}" if detail else caption, KEPT_COLOUR if kept else DROPPED_COLOUR
        )

    def quality_tile(key: str, reason: str) -> Image.Image:
        row = stats.loc[key] if key in stats.index else None
        has = row is not None and all(c in row.index and pd.notna(row[c]) for c in QUALITY_KEYS)
        return tile(key, tripped_statistic(reason, row, quality_cfg) if has and row is not None else "")

    pair_rows = [
        [
            t
            for (a, b), sim in zip(pairs[i : i + 3], sims[i : i + 3], strict=True)
            for t in (tile(a, f"cos {sim:.4f}"), tile(b, "its twin"))
        ]
        for i in range(0, len(pairs), 3)
    ]
    sheets = {
        "removed_low_quality.png": (
            "removed: low quality, one row per reason (the statistic that tripped, vs its threshold)",
            [[quality_tile(k, r) for k in ks] for r, ks in quality.items()] or [[]],
        ),
        "removed_outliers.png": (
            "removed: embedding outliers and small clusters (cosine distance to the centroid)",
            [[tile(k, f"dist {float(info.at[k, 'score']):.3f}") for k in ks] for ks in outliers.values()] or [[]],
        ),
        "removed_redundant.png": (
            "removed near-duplicate (left, with cosine similarity) beside the sample it duplicates (right)",
            pair_rows or [[]],
        ),
        "removed_downstream_overlap.png": (
            "removed before selection: copies of downstream images (pairs: the overlap stage's overlap.png)",
            _in_rows([tile(k, matched.get(k, "")[-CAPTION_CHARS:]) for k in overlap]),
        ),
        "clusters.png": (
            "largest clusters: kept (green) vs dropped (red), one row per cluster",
            [[tile(k, f"cluster {c}") for k in a + b] for c, a, b in clusters] or [[]],
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
    hardness: str = "MAE loss",
) -> list[Path]:
    """OptiDEL sheets in ``<out_dir>/gallery/``: sources with their SAM boxes, hardest/easiest patches, mosaics.

    ``mosaic_sources.png`` shows each of the first mosaics beside its 4 source images with
    the SAM box that became its quadrant (TL, TR, BL, BR), so a reader can check what a
    mosaic is made of; every sheet has at most ``count`` tiles.

    Args:
        rec: the patch records (source, box, score, ...), one row per patch.
        mosaic_keys: key of each mosaic, in mosaic order (its pixels are read back from
            ``<out_dir>/generated``).
        tar_of: pool key -> tar path of its image.
        count: tiles per sheet.
        hardness: what the score is, for the sheet titles.

    Shape:
        selected: (P,) bool; groups: (M, 4) rows of ``rec`` per mosaic.
    """
    out = Path(out_dir)
    hard, easy = hardness_extremes(rec["score"], count)
    sources = list(dict.fromkeys(str(rec["source"][r]) for r in groups.ravel()))[:count]
    rows_of = {s: np.flatnonzero(rec["source"] == s) for s in sources}
    shown = groups[: max(1, count // MOSAIC_ROW)]
    needed: dict[str, set[tuple[int, ...]]] = {}
    for r in np.concatenate([hard, easy]):
        needed.setdefault(str(rec["source"][r]), set()).add(tuple(int(v) for v in rec["box"][r]))
    crops, _ = read_crops(needed, tar_of)
    full: dict[str, np.ndarray] = {}
    for s in dict.fromkeys([*sources, *(str(rec["source"][r]) for r in shown.ravel())]):
        for sample in iter_shard(tar_of[s], {s}):
            full[s] = np.asarray(sample["image"], dtype=np.uint8)

    def patch_tile(r: int) -> Image.Image:
        crop = crops[(str(rec["source"][r]), tuple(int(v) for v in rec["box"][r]))]
        thumb = crop_patch(crop, (0, 0, crop.shape[1], crop.shape[0]), PATCH_SIDE)
        return _tile(Image.fromarray(thumb, "RGB"), f"score {rec['score'][r]:.4f}", NEUTRAL_COLOUR)

    wanted = set(mosaic_keys[: min(count, len(groups))])
    mosaic_img: dict[str, Image.Image] = {}
    for tar in sorted((out / GENERATED_DIR).glob("mosaic-*.tar")):
        if len(mosaic_img) >= len(wanted):
            break
        mosaic_img.update((s["key"], s["image"]) for s in iter_shard(str(tar), wanted))
    mosaics = [_tile(mosaic_img[k], k.rsplit("_", 1)[-1], KEPT_COLOUR) for k in mosaic_keys if k in mosaic_img]

    def source_tile(r: int, quadrant: str) -> Image.Image:
        src = str(rec["source"][r])
        picture = _with_boxes(full[src], rec["box"][r : r + 1], np.ones(1, dtype=bool))
        return _tile(picture, f"{quadrant} {src[:14]}\nscore {rec['score'][r]:.4f}", NEUTRAL_COLOUR)

    mosaic_rows = [
        [
            _tile(mosaic_img.get(mosaic_keys[m]), mosaic_keys[m].rsplit("_", 1)[-1], KEPT_COLOUR),
            *(source_tile(int(r), q) for r, q in zip(row, ("TL", "TR", "BL", "BR"), strict=True)),
        ]
        for m, row in enumerate(shown)
    ]
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
        "hardest_patches.png": (f"hardest patches (highest {hardness})", _in_rows([patch_tile(r) for r in hard])),
        "easiest_patches.png": (f"easiest patches (lowest {hardness})", _in_rows([patch_tile(r) for r in easy])),
        "mosaics.png": ("generated mosaics (2x2 hard patches)", _in_rows(mosaics)),
        "mosaic_sources.png": (
            "each mosaic (left) beside its 4 sources, SAM box of the quadrant in red (TL, TR, BL, BR)",
            mosaic_rows or [[]],
        ),
    }
    return _save_sheets(out / GALLERY_DIR, sheets)
