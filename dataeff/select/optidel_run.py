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
   of serialising it on rank 0 (``mosaic_shards.py``). Rank 0 writes the shard index
   once all are written.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from dataeff import dist
from dataeff.constants import GENERATED_DIR, IMAGENET_MEAN, IMAGENET_STD, MAE_CKPT
from dataeff.data.stream import iter_shard
from dataeff.files import write_atomic
from dataeff.select import manifest
from dataeff.select.compose import PATCHES_PER_MOSAIC
from dataeff.select.config import SelectConfig
from dataeff.select.distributed_cluster import cluster_pool
from dataeff.select.gallery import write_optidel_gallery
from dataeff.select.mosaic_shards import Records, write_generated
from dataeff.select.optidel import assign_mosaics, budget, cluster_cap, coverage, select_hardest
from dataeff.select.sam_hard import (
    RECORD_FIELDS,
    ScoreFn,
    build_sam,
    concat_records,
    extract_and_score,
    mask_generator,
)

log = logging.getLogger("dataeff")

#: Table of every SAM patch with its provenance, score, cluster and mosaic slot.
PATCHES_NAME = "patches.parquet"
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
    # Imported here, not for a cycle: it pulls in pytorch_lightning (~2 s), which only this method needs.
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


def fingerprint(cfg: SelectConfig, scorer_path: str) -> str:
    """What a cached per-shard result depends on: SAM settings, scorer file, mask seed."""
    sam = {k: v for k, v in vars(cfg.sam).items() if k not in ("device", "cache_dir")}
    ckpt = Path(scorer_path)
    ckpt = ckpt / MAE_CKPT if ckpt.is_dir() else ckpt
    stat = ckpt.stat()
    blob = json.dumps([sam, str(ckpt.resolve()), stat.st_size, stat.st_mtime_ns, cfg.optidel.mask_seed], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def extract_owned(
    tars: list[str], counts: dict[str, int], cfg: SelectConfig, rank: int, world: int
) -> list[dict[str, Any]]:
    """SAM patches + hardness of the shards this rank owns (i % W == rank), resuming finished ones."""
    owned = tars[rank::world]
    work = Path(cfg.sam.cache_dir) if cfg.sam.cache_dir else Path(cfg.out) / "sam"
    work.mkdir(parents=True, exist_ok=True)
    stamp = fingerprint(cfg, cfg.scorer)
    parts: list[dict[str, Any]] = []
    todo: list[tuple[str, Path]] = []
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
            write_atomic(path, partial(_save_part, stamp=stamp, part=part), keep_suffix=True)
            parts.append(part)
    return parts


def _save_part(tmp: Path, stamp: str, part: dict[str, Any]) -> None:
    # keep_suffix: np.savez appends ".npz" to a name without it.
    np.savez(tmp, fingerprint=np.array(stamp), **part)


def merge_parts(parts: list[dict[str, Any]]) -> tuple[Records, dict[str, Any]]:
    """All ranks' shard results -> (patch records sorted by (source, index), per-image arrays sorted by key)."""
    rec = concat_records(parts)
    order = np.lexsort((rec["index"], rec["source"]))
    rec = {k: v[order] for k, v in rec.items()}
    cat = {
        n: np.concatenate([p[n] for p in parts]) if parts else np.zeros(0)
        for n in ("image_keys", "image_scores", "skipped_keys", "skipped_reasons")
    }
    order = np.argsort(cat["image_keys"], kind="stable")
    images: dict[str, Any] = {
        "keys": cat["image_keys"][order].astype(str),
        "scores": cat["image_scores"][order].astype(np.float32),
    }
    images["skipped"] = dict(zip(cat["skipped_keys"].astype(str), cat["skipped_reasons"].astype(str), strict=False))
    images["sam_s"] = float(sum(float(p["sam_s"]) for p in parts))
    images["score_s"] = float(sum(float(p["score_s"]) for p in parts))
    return rec, images


def run_optidel(
    emb: np.ndarray, keys: np.ndarray, quality: pd.DataFrame | None, cfg: SelectConfig, rank: int, world: int
) -> manifest.Decisions:
    """OptiDEL for the select stage: same decisions on every rank, mosaics in ``<out>/generated``.

    Shape:
        emb: (N, D) float16, keys: (N,) sorted; quality: the pool's ok index rows aligned to keys
        (required: they locate each image's shard).
    """
    if quality is None:
        raise ValueError("optidel needs the pool's index rows (shard, shard_dir) to read the images")
    oc = cfg.optidel
    timings: dict[str, float] = {}
    labels, _, k = cluster_pool(emb, cfg.cluster, cfg.seed, rank, world, timings)
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
    gen = write_generated(
        Path(cfg.out) / GENERATED_DIR, run, groups, rec, cl, tar_of, oc.mosaics_per_shard, rank, world
    )
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
            pngs = write_optidel_gallery(
                cfg.out, rec, selected, groups, gen["key"].tolist(), tar_of, cfg.report.per_sheet
            )
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


def _v_information(
    rec: Records,
    cl: np.ndarray,
    labels: np.ndarray,
    chosen: np.ndarray,
    passes: np.ndarray,
    images: dict[str, Any],
    orig_kept: np.ndarray,
    k: int,
    cfg: SelectConfig,
) -> dict[str, Any]:
    """The V-information view of the selection (summary.json): hardness and cluster coverage.

    Shape:
        cl: (P,) cluster of each patch's source, labels: (N,), chosen/passes: (K,), orig_kept: (N,) bool.
    """
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
    out: Path, rec: Records, cl: np.ndarray, selected: np.ndarray, groups: np.ndarray, mosaic_keys: np.ndarray
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
    write_atomic(out / PATCHES_NAME, lambda tmp: frame.to_parquet(tmp, index=False))


def _safe(name: str) -> str:
    """A key-safe run name (keys allow only [A-Za-z0-9_-])."""
    return "".join(c if c.isalnum() or c in "_-" else "_" for c in name) or "run"
