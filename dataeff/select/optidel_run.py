"""``dataeff select method=optidel``: the distributed shell around OptiDEL's pure core.

1. SAM + hardness: pool shard i is processed by rank i % W (SAM on the GPU when present,
   MAE scoring with a fixed mask seed); each shard's patch records land in
   ``<out>/sam/<shard>.npz`` or ``sam.cache_dir`` (resume unit; a fingerprint of the settings guards reuse).
2. The records of all ranks are all-gathered and sorted by (source key, patch index);
   selection and mosaic assignment are pure functions of that table (``optidel.py``),
   so every rank computes the same plan.
3. Composition: mosaic shard j is written by rank j % W. Each shard is a pure function
   of the plan and the source images (fixed tar headers, lossless PNG), so the bytes do
   not depend on W — splitting composition keeps its decode/encode cost parallel instead
   of serialising it on rank 0. Rank 0 writes the shard index once all are written.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from dataeff import dist
from dataeff.data.stream import IMAGENET_MEAN, IMAGENET_STD, iter_shard
from dataeff.files import write_atomic
from dataeff.select import manifest
from dataeff.select.compose import PATCHES_PER_MOSAIC
from dataeff.select.optidel import assign_mosaics, budget, cluster_cap, coverage, select_hardest
from dataeff.select.sam_hard import (
    RECORD_FIELDS,
    ScoreFn,
    build_sam,
    concat_records,
    extract_and_score,
    mask_generator,
    mosaic_key,
    read_crops,
    write_generated,
)

log = logging.getLogger("dataeff")

_PART_FIELDS = RECORD_FIELDS + ("image_keys", "image_scores", "skipped_keys", "skipped_reasons", "sam_s", "score_s")


def pick_device(name: str) -> torch.device:
    """'auto' = the local CUDA device when there is one, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def mae_scorer(path: str, device: torch.device, mask_seed: int) -> tuple[ScoreFn, int]:
    """Hardness = per-sample MAE reconstruction loss of the pre-trained model at ``path``.

    Returns:
        (score function on (B, S, S, 3) uint8 batches -> (B,) float32, the side S).
    """
    from dataeff.models.mae import MAE

    mae = MAE.load_for_scoring(path, device)
    side = int(mae.encoder.patch_embed.img_size[0])
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)

    def score(batch: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(np.ascontiguousarray(batch)).permute(0, 3, 1, 2).float().div_(255.0)
        return mae.reconstruction_loss(((x - mean) / std).to(device), mask_seed).cpu().numpy()

    return score, side


def pool_tars(quality: pd.DataFrame) -> list[str]:
    """Pool shard paths in a fixed order (shard directory, then tar name)."""
    pairs = quality[["shard_dir", "shard"]].drop_duplicates().sort_values(["shard_dir", "shard"])
    return [str(Path(d) / s) for d, s in pairs.itertuples(index=False)]


def fingerprint(cfg: Any, scorer_path: str) -> str:
    """What a cached per-shard result depends on: SAM settings, scorer file, mask seed."""
    sam = {k: v for k, v in vars(cfg.sam).items() if k not in ("device", "cache_dir")}
    ckpt = Path(scorer_path)
    ckpt = ckpt / "mae.ckpt" if ckpt.is_dir() else ckpt
    stat = ckpt.stat()
    blob = json.dumps([sam, str(ckpt.resolve()), stat.st_size, stat.st_mtime_ns, cfg.optidel.mask_seed], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def extract_owned(tars: list[str], counts: dict[str, int], cfg: Any, rank: int, world: int) -> list[dict]:
    """SAM patches + hardness of the shards this rank owns (i % W == rank), resuming finished ones."""
    owned = tars[rank::world]
    work = Path(cfg.sam.cache_dir) if cfg.sam.cache_dir else Path(cfg.out) / "sam"
    work.mkdir(parents=True, exist_ok=True)
    stamp = fingerprint(cfg, cfg.scorer)
    parts, todo = [], []
    for tar in owned:
        path = work / (Path(tar).stem + ".npz")
        if path.is_file():
            with np.load(path, allow_pickle=False) as z:
                if str(z["fingerprint"]) == stamp:
                    parts.append({name: z[name] for name in _PART_FIELDS})
                    continue
            log.info("%s was made with other settings; redoing it", path)
        todo.append((tar, path))
    if not todo:
        return parts
    device = pick_device(cfg.sam.device)
    generator = mask_generator(build_sam(cfg.sam, device), cfg.sam)
    score_fn, side = mae_scorer(cfg.scorer, device, cfg.optidel.mask_seed)
    total = sum(counts.get(Path(t).name, 0) for t, _ in todo)
    with tqdm(total=total, unit="img", desc="optidel sam+score", disable=rank != 0, smoothing=0.1) as bar:
        for tar, path in todo:
            samples = ((s["key"], np.asarray(s["image"], dtype=np.uint8)) for s in iter_shard(tar))
            part = extract_and_score(
                samples, generator, cfg.sam, side, score_fn, cfg.optidel.batch_size, lambda: bar.update(1)
            )
            tmp = path.with_name(path.stem + ".tmp.npz")
            np.savez(tmp, fingerprint=np.array(stamp), **part)
            tmp.replace(path)
            parts.append(part)
    return parts


def merge_parts(parts: list[dict]) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """All ranks' shard results -> (patch records sorted by (source, index), per-image arrays sorted by key)."""
    rec = concat_records(parts)
    order = np.lexsort((rec["index"], rec["source"]))
    rec = {k: v[order] for k, v in rec.items()}
    cat = {
        n: np.concatenate([p[n] for p in parts]) if parts else np.zeros(0)
        for n in ("image_keys", "image_scores", "skipped_keys", "skipped_reasons")
    }
    order = np.argsort(cat["image_keys"], kind="stable")
    images = {"keys": cat["image_keys"][order].astype(str), "scores": cat["image_scores"][order].astype(np.float32)}
    images["skipped"] = dict(zip(cat["skipped_keys"].astype(str), cat["skipped_reasons"].astype(str), strict=False))
    images["sam_s"] = float(sum(float(p["sam_s"]) for p in parts))
    images["score_s"] = float(sum(float(p["score_s"]) for p in parts))
    return rec, images


def run_optidel(
    emb: np.ndarray, keys: np.ndarray, quality: pd.DataFrame, cfg: Any, rank: int, world: int
) -> manifest.Decisions:
    """OptiDEL for the select stage: same decisions on every rank, mosaics in ``<out>/generated``.

    Shape:
        emb: (N, D) float16, keys: (N,) sorted; quality: the pool's ok index rows aligned to keys.
    """
    from dataeff.select.stage import cluster_pool

    oc, timings = cfg.optidel, {}
    labels, _, k = cluster_pool(emb, cfg, rank, world, timings)
    tars = pool_tars(quality)
    counts = quality.groupby("shard").size().to_dict()
    parts = extract_owned(tars, counts, cfg, rank, world)
    rec, images = merge_parts([p for rank_parts in dist.all_gather_object(parts) for p in rank_parts])
    timings.update(sam=images["sam_s"], score=images["score_s"])
    if not np.array_equal(images["keys"], keys):
        raise RuntimeError("SAM pass saw a different set of samples than the index lists; re-run 'dataeff shard'")

    cl = labels[np.searchsorted(keys, rec["source"])] if len(rec["source"]) else np.zeros(0, np.int64)
    n_mosaics, n_orig = budget(cfg.ratio, len(keys), oc.include_originals, oc.originals_fraction)
    want = PATCHES_PER_MOSAIC * n_mosaics
    chosen, passes = select_hardest(
        rec["score"], rec["source"], cl, want, oc.max_per_image, cluster_cap(want, k, oc.cluster_cap_factor)
    )
    info: dict[str, Any] = {}
    if len(chosen) < want:
        n_mosaics = len(chosen) // PATCHES_PER_MOSAIC
        info["shortfall"] = (
            f"optidel: only {len(rec['score'])} usable SAM patches for {want} wanted; wrote {n_mosaics} mosaics. "
            "Relax sam.min_area_frac/max_area_frac or the SAM thresholds, or raise sam.max_masks_per_image"
        )
        chosen, passes = chosen[: PATCHES_PER_MOSAIC * n_mosaics], passes[: PATCHES_PER_MOSAIC * n_mosaics]
    groups = assign_mosaics(chosen, rec["source"], cl, rec["score"])
    orig_kept = np.zeros(len(keys), dtype=bool)
    if n_orig:
        picked, _ = select_hardest(
            images["scores"], keys, labels, n_orig, 1, cluster_cap(n_orig, k, oc.cluster_cap_factor)
        )
        orig_kept[picked] = True

    t = time.time()
    run = _safe(Path(cfg.out).resolve().name)
    tar_of = dict(
        zip(
            quality["key"],
            (str(Path(d) / s) for d, s in zip(quality["shard_dir"], quality["shard"], strict=False)),
            strict=False,
        )
    )
    gen = write_generated(Path(cfg.out) / "generated", run, groups, rec, cl, tar_of, oc.mosaics_per_shard, rank, world)
    timings["compose"] = time.time() - t

    selected = np.zeros(len(rec["score"]), dtype=bool)
    selected[chosen] = True
    info.update(_v_information(rec, cl, labels, chosen, passes, images, orig_kept, k, cfg))
    info.update(
        mosaics=int(len(groups)), originals=int(orig_kept.sum()), timings_s={a: round(b, 3) for a, b in timings.items()}
    )
    if rank == 0:
        _write_patch_table(Path(cfg.out), rec, cl, selected, groups, gen["key"].to_numpy())
        if cfg.report.gallery:
            pngs = write_gallery(Path(cfg.out), rec, selected, groups, tar_of, cfg.report.per_sheet)
            info["optidel_gallery"] = [str(p) for p in pngs]
    reason = np.array([images["skipped"].get(kk, "") for kk in keys], dtype=object)
    return manifest.Decisions(
        kept=orig_kept,
        reason=manifest.reasons_for(orig_kept, reason),
        cluster=labels.astype(np.int64),
        score=images["scores"],
        info=info,
        generated=gen,
    )


def _v_information(rec, cl, labels, chosen, passes, images, orig_kept, k, cfg) -> dict[str, Any]:
    """The V-information view of the selection (summary.json): hardness and cluster coverage."""
    scores = rec["score"]
    skipped: dict[str, int] = {}
    for reason in images["skipped"].values():
        skipped[reason] = skipped.get(reason, 0) + 1
    cov = coverage(np.concatenate([cl[chosen], labels[orig_kept]]), labels)
    return {
        "sam_model": cfg.sam.model if cfg.sam.model != "tiny" else "tiny (random init; not a real SAM)",
        "sam_checkpoint": Path(cfg.sam.checkpoint).name if cfg.sam.checkpoint else "",
        "scorer": cfg.scorer,
        "k": int(k),
        "patches": int(len(scores)),
        "images_with_patches": int(len(np.unique(rec["source"]))),
        "images_skipped": skipped,
        "patches_selected": int(len(chosen)),
        "selection_passes": {
            name: int((passes == i).sum()) for i, name in enumerate(("capped", "cluster_cap_relaxed", "uncapped"))
        },
        "mean_hardness_selected": float(scores[chosen].mean()) if len(chosen) else float("nan"),
        "mean_hardness_all": float(scores.mean()) if len(scores) else float("nan"),
        "mean_hardness_originals_selected": float(images["scores"][orig_kept].mean()) if orig_kept.any() else None,
        "mean_hardness_originals_all": float(images["scores"].mean()) if len(images["scores"]) else float("nan"),
        **cov,
    }


def _write_patch_table(
    out: Path, rec: dict, cl: np.ndarray, selected: np.ndarray, groups: np.ndarray, mosaic_keys: np.ndarray
) -> None:
    """``patches.parquet``: every SAM patch with its provenance, score, cluster and mosaic slot."""
    mosaic = np.full(len(cl), "", dtype=object)
    slot = np.full(len(cl), -1, dtype=np.int8)
    for m, row in enumerate(groups):
        mosaic[row], slot[row] = mosaic_keys[m], np.arange(PATCHES_PER_MOSAIC)
    frame = pd.DataFrame(
        {
            "source": rec["source"].astype(object),
            "index": rec["index"],
            "x0": rec["box"][:, 0],
            "y0": rec["box"][:, 1],
            "x1": rec["box"][:, 2],
            "y1": rec["box"][:, 3],
            "area": rec["area"],
            "area_frac": rec["area_frac"],
            "pred_iou": rec["pred_iou"],
            "stability": rec["stability"],
            "score": rec["score"],
            "cluster": cl.astype(np.int64),
            "selected": selected,
            "mosaic": mosaic,
            "quadrant": slot,
        }
    )
    write_atomic(out / "patches.parquet", lambda tmp: frame.to_parquet(tmp, index=False))


def _safe(name: str) -> str:
    """A key-safe run name (keys allow only [A-Za-z0-9_-])."""
    return "".join(c if c.isalnum() or c in "_-" else "_" for c in name) or "run"


def write_gallery(
    out: Path, rec: dict, selected: np.ndarray, groups: np.ndarray, tar_of: dict, count: int
) -> list[Path]:
    """PNGs under ``<out>/gallery/``: sources with their SAM boxes, hardest/easiest patches, mosaics."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    from dataeff.select.compose import crop_patch

    folder = out / "gallery"
    folder.mkdir(parents=True, exist_ok=True)
    written = []

    def sheet(name: str, items: list[tuple[np.ndarray, str]], draw=None) -> None:
        if not items:
            return
        cols = min(len(items), 6)
        rows = -(-len(items) // cols)
        fig, axes = plt.subplots(rows, cols, figsize=(2.4 * cols, 2.6 * rows), squeeze=False)
        for ax in axes.ravel():
            ax.axis("off")
        for i, (img, title) in enumerate(items):
            ax = axes.ravel()[i]
            ax.imshow(img)
            ax.set_title(title, fontsize=7)
            if draw is not None:
                draw(ax, i)
        fig.tight_layout()
        fig.savefig(folder / name, dpi=100)
        plt.close(fig)
        written.append(folder / name)

    order = np.argsort(-rec["score"], kind="stable")
    hard, easy = order[:count], order[::-1][:count]
    sources = list(dict.fromkeys(str(rec["source"][r]) for r in groups.ravel()))[:count]
    rows_of = {s: np.flatnonzero(rec["source"] == s) for s in sources}
    needed: dict[str, set] = {}
    for r in np.concatenate([hard, easy]):
        needed.setdefault(str(rec["source"][r]), set()).add(tuple(int(v) for v in rec["box"][r]))
    crops, _ = read_crops(needed, tar_of)
    full = {}
    for s in sources:
        for sample in iter_shard(tar_of[s], {s}):
            full[s] = np.asarray(sample["image"], dtype=np.uint8)

    def boxes(ax, i):
        for r in rows_of[sources[i]]:
            x0, y0, x1, y1 = rec["box"][r]
            color = "red" if selected[r] else "yellow"
            ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor=color, linewidth=1.2))

    sheet("sources_sam_boxes.png", [(full[s], f"{s[:18]} ({len(rows_of[s])} boxes)") for s in sources], boxes)
    for name, picked in (("hardest_patches.png", hard), ("easiest_patches.png", easy)):
        items = []
        for r in picked:
            box = tuple(int(v) for v in rec["box"][r])
            crop = crops[(str(rec["source"][r]), box)]
            items.append((crop_patch(crop, (0, 0, crop.shape[1], crop.shape[0]), 96), f"score {rec['score'][r]:.4f}"))
        sheet(name, items)
    gen = out / "generated"
    wanted = {mosaic_key(_safe(out.resolve().name), i) for i in range(min(count, len(groups)))}
    mosaics = []
    for tar in sorted(gen.glob("mosaic-*.tar")):
        if len(mosaics) >= len(wanted):
            break
        mosaics += [(np.asarray(s["image"]), s["key"].rsplit("_", 1)[-1]) for s in iter_shard(str(tar), wanted)]
    sheet("mosaics.png", mosaics)
    return written
