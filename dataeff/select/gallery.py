"""PNG contact sheets of a selection: what was removed, and why, and a few clusters.

``pick_*`` functions are pure (manifest table in, keys out); :func:`write_gallery`
reads the chosen images from the shards and draws the sheets with PIL: each tile has
a caption, kept samples a green frame and dropped ones a red frame.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw

from dataeff.select.audit import QUALITY

TILE = 112
CAPTION = 14
KEPT, DROPPED = (40, 170, 60), (210, 40, 40)


def _sample(keys: list[str], n: int, seed: int) -> list[str]:
    if len(keys) <= n:
        return keys
    return sorted(np.random.default_rng(seed).choice(keys, size=n, replace=False).tolist())


def pick_removed(frame: pd.DataFrame, reasons: tuple[str, ...], n: int, seed: int) -> list[str]:
    """Up to ``n`` dropped keys whose reason is one of ``reasons`` (seeded sample)."""
    return _sample(frame.loc[frame["reason"].isin(reasons), "key"].tolist(), n, seed)


def pick_redundant_pairs(frame: pd.DataFrame, n: int, seed: int) -> list[tuple[str, str]]:
    """Up to ``n`` (removed, twin) pairs, preferring twins that were kept."""
    red = frame[frame["reason"].str.startswith("redundant_of:")]
    twins = red["reason"].str.slice(len("redundant_of:"))
    kept = set(frame.loc[frame["kept"], "key"])
    pairs = list(zip(red["key"], twins, strict=False))
    first = [p for p in pairs if p[1] in kept] or pairs
    chosen = _sample([f"{a}\t{b}" for a, b in first], n, seed)
    return [tuple(c.split("\t")) for c in chosen]  # type: ignore[misc]


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


def load_images(keys: set[str], index: pd.DataFrame) -> dict[str, Image.Image]:
    """The images of ``keys`` from their shards (index columns key, shard, shard_dir)."""
    from dataeff.data.stream import iter_shard

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


def write_gallery(out_dir: str | Path, frame: pd.DataFrame, index: pd.DataFrame, cfg, seed: int) -> list[Path]:
    """Write ``gallery/*.png`` into ``out_dir``; returns the written paths.

    ``cfg`` has ``per_sheet`` (examples per sheet) and ``clusters`` (clusters shown).
    """
    out = Path(out_dir) / "gallery"
    out.mkdir(parents=True, exist_ok=True)
    n, per_row = cfg.per_sheet, 6
    quality = pick_removed(frame, QUALITY, n, seed)
    outliers = pick_removed(frame, ("outlier", "small_cluster"), n, seed)
    pairs = pick_redundant_pairs(frame, n // 2 or 1, seed)
    clusters = pick_clusters(frame, cfg.clusters, per_row // 2, seed)
    wanted = set(quality) | set(outliers) | {k for p in pairs for k in p} | {k for _, a, b in clusters for k in a + b}
    images = load_images(wanted, index)
    info = frame.set_index("key")

    def tile(key: str) -> Image.Image:
        kept = bool(info.at[key, "kept"])
        reason = str(info.at[key, "reason"])
        caption = "kept" if kept else ("redundant" if reason.startswith("redundant_of:") else reason)
        return _tile(images.get(key), caption, KEPT if kept else DROPPED)

    def rows_of(keys: list[str]) -> list[list[Image.Image]]:
        tiles = [tile(k) for k in keys]
        return [tiles[i : i + per_row] for i in range(0, len(tiles), per_row)] or [[]]

    written = []
    sheets = {
        "removed_low_quality.png": ("removed: low quality (dark / blank / overexposed / blurred)", rows_of(quality)),
        "removed_outliers.png": ("removed: embedding outliers and small clusters", rows_of(outliers)),
        "removed_redundant.png": (
            "removed near-duplicate (left) beside the sample it duplicates (right)",
            [[tile(a), tile(b)] for a, b in pairs] or [[]],
        ),
        "clusters.png": (
            "largest clusters: kept (green) vs dropped (red), one row per cluster",
            [[tile(k) for k in a + b] for _, a, b in clusters] or [[]],
        ),
    }
    for name, (title, rows) in sheets.items():
        _sheet(title, rows).save(out / name)
        written.append(out / name)
    return written
