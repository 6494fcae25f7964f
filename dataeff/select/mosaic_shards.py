"""OptiDEL's generated samples: mosaics composed from selected SAM patches, written as a shard set.

PAPERS.md, OptiDEL step 4. The pure image operations are in ``compose.py``; this module
reads the source crops, encodes each mosaic (lossless PNG, fixed tar headers) and writes
``<selection>/generated/`` as a standard shard directory (``mosaic-%06d.tar``,
``index.parquet``, ``summary.json``), so pre-training streams mosaics like any pool.
"""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image

from dataeff import dist
from dataeff.constants import INDEX_NAME, KEPT, SHARDS_FORMAT, SUMMARY_NAME
from dataeff.data.quality import gray_thumbnail, quality_stats
from dataeff.data.shard import journal_rows, restore_rows, write_index, write_tar
from dataeff.data.signatures import image_signature
from dataeff.data.stream import iter_shard
from dataeff.files import write_json_atomic
from dataeff.select.compose import compose_mosaic

#: Patch-record arrays by field name (``sam_hard.RECORD_FIELDS``), one row per patch.
Records = dict[str, np.ndarray]
#: ``(source key, (x0, y0, x1, y1))`` -> the box's pixels.
Crops = dict[tuple[str, tuple[int, ...]], np.ndarray]


def mosaic_key(run: str, index: int) -> str:
    """Key of mosaic ``index`` of a run: ``<run>_mosaic<k>`` (k zero-padded so keys sort by k)."""
    return f"{run}_mosaic{index:06d}"


def read_crops(
    needed: dict[str, set[tuple[int, ...]]], tar_of: dict[str, str]
) -> tuple[Crops, dict[str, tuple[int, int]]]:
    """The box crops of the needed source images, reading each source tar once.

    Returns:
        ``({(key, box): (h, w, 3) uint8 crop}, {key: (width, height)})``.
    """
    by_tar: dict[str, set[str]] = {}
    for key in needed:
        by_tar.setdefault(tar_of[key], set()).add(key)
    crops: Crops = {}
    sizes: dict[str, tuple[int, int]] = {}
    for tar in sorted(by_tar):
        for sample in iter_shard(tar, by_tar[tar]):
            image = np.asarray(sample["image"], dtype=np.uint8)
            sizes[sample["key"]] = (image.shape[1], image.shape[0])
            for box in needed[sample["key"]]:
                x0, y0, x1, y1 = box
                crops[(sample["key"], box)] = image[y0:y1, x0:x1].copy()
    missing = set(needed) - set(sizes)
    if missing:
        raise RuntimeError(
            f"{len(missing)} source image(s) of selected patches not found in their shards, e.g. {min(missing)}"
        )
    return crops, sizes


def mosaic_sample(
    key: str,
    run: str,
    rows: np.ndarray,
    rec: Records,
    clusters: np.ndarray,
    crops: Crops,
    sizes: dict[str, tuple[int, int]],
) -> tuple[list[tuple[str, bytes]], dict[str, Any]]:
    """Tar members (PNG + JSON) and the index row of one mosaic; deterministic bytes.

    The mosaic takes the size of its top-left patch's source image ("at the original
    image size"); each quadrant is its crop resized to half that size per side.
    """
    boxes = [tuple(int(v) for v in rec["box"][r]) for r in rows]
    sources = [str(rec["source"][r]) for r in rows]
    width, height = sizes[sources[0]]
    pieces = [(crops[(s, b)], (0, 0, b[2] - b[0], b[3] - b[1])) for s, b in zip(sources, boxes, strict=False)]
    mosaic = Image.fromarray(compose_mosaic(pieces, width, height), "RGB")
    buf = io.BytesIO()
    mosaic.save(buf, format="PNG", optimize=False, compress_level=6)
    png = buf.getvalue()
    stats = quality_stats(gray_thumbnail(mosaic))
    digest = hashlib.sha256(png).hexdigest()
    meta = {
        "key": key,
        "source": f"optidel:{run}",
        "site": "generated",
        "width": width,
        "height": height,
        "sha256": digest,
        "mode": "RGB",
        "quality": stats,
        "generated": True,
        "method": "optidel",
        "patches": [
            {
                "quadrant": q,
                "source": s,
                "box": list(b),
                "score": round(float(rec["score"][r]), 6),
                "cluster": int(clusters[r]),
            }
            for q, (s, b, r) in enumerate(zip(sources, boxes, rows, strict=False))
        ],
    }
    blob = json.dumps(meta, sort_keys=True, separators=(",", ":")).encode()
    row = {
        "key": key,
        "source": f"optidel:{run}",
        "site": "generated",
        "status": "ok",
        "reason": "",
        "size": len(png),
        "sha256": digest,
        "width": width,
        "height": height,
        **stats,
        # the leakage guard and MedDEL read these from every index row, mosaics included
        **image_signature(mosaic),
    }
    return [(f"{key}.png", png), (f"{key}.json", blob)], row


def write_generated(
    gen_dir: Path,
    run: str,
    groups: np.ndarray,
    rec: Records,
    clusters: np.ndarray,
    tar_of: dict[str, str],
    per_shard: int,
    rank: int,
    world: int,
) -> pd.DataFrame:
    """Write the mosaics as a shard directory (tars + index.parquet + summary.json).

    Mosaic shard j is written by rank j % world; its bytes depend only on the plan and
    the source images, so any world size gives the same files. Finished shards are
    journalled in ``.parts/`` and skipped on a re-run with the same plan.

    Shape:
        groups: (M, 4) rows of ``rec`` -> selection rows for the M mosaics
        (key, kept, reason, cluster, score).
    """
    keys = [mosaic_key(run, i) for i in range(len(groups))]
    plan = [[keys[i]] + [[str(rec["source"][r]), rec["box"][r].tolist()] for r in g] for i, g in enumerate(groups)]
    signature = hashlib.sha256(json.dumps(plan).encode()).hexdigest()[:16]
    parts = gen_dir / ".parts"
    parts.mkdir(parents=True, exist_ok=True)
    n_shards = -(-len(groups) // per_shard)
    mine: list[dict[str, Any]] = []
    for j in range(rank, n_shards, world):
        name = f"mosaic-{j:06d}.tar"
        journal = parts / f"{name}.json"
        if journal.is_file() and (gen_dir / name).is_file():
            done = json.loads(journal.read_text())
            if done.get("signature") == signature:
                mine += restore_rows(done["rows"])
                continue
        ids = range(j * per_shard, min(len(groups), (j + 1) * per_shard))
        needed: dict[str, set[tuple[int, ...]]] = {}
        for i in ids:
            for r in groups[i]:
                needed.setdefault(str(rec["source"][r]), set()).add(tuple(int(v) for v in rec["box"][r]))
        crops, sizes = read_crops(needed, tar_of)
        members, rows = [], []
        for i in ids:
            sample, row = mosaic_sample(keys[i], run, groups[i], rec, clusters, crops, sizes)
            members += sample
            rows.append({**row, "shard": name})
        spans = write_tar(gen_dir / name, members)
        for row, (offset, length) in zip(rows, spans[::2], strict=False):  # each sample: image, then JSON
            row.update(offset=offset, length=length)
        write_json_atomic(journal, {"signature": signature, "rows": journal_rows(rows)})
        mine += rows
    rows = sorted((r for rank_rows in dist.all_gather_object(mine) for r in rank_rows), key=lambda r: r["key"])
    if rank == 0:
        for stale in sorted(gen_dir.glob("mosaic-*.tar")):
            if int(stale.stem.split("-")[-1]) >= n_shards:
                stale.unlink()  # left by an earlier, larger plan
        write_index(gen_dir / INDEX_NAME, rows)
        summary = {
            "format": SHARDS_FORMAT,
            "name": "generated",
            "method": "optidel",
            "run": run,
            "num_files": len(rows),
            "num_samples": len(rows),
            "num_shards": n_shards,
            "counts_by_status": {"ok": len(rows)},
            "counts_by_reason": {},
            "signature": signature,
        }
        write_json_atomic(gen_dir / SUMMARY_NAME, summary, indent=1, sort_keys=True)
    dist.barrier()
    score = np.array([rec["score"][g].mean() for g in groups], dtype=np.float32).reshape(-1)
    return pd.DataFrame({"key": keys, "kept": True, "reason": KEPT, "cluster": -1, "score": score}).astype(
        {"cluster": np.int64, "kept": bool}
    )
