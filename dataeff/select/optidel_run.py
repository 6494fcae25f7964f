"""``dataeff select method=optidel``: the distributed shell around OptiDEL's pure core.

1. SAM + hardness: pool shard i is processed by rank i % W (SAM, batched over images, on the GPU when present,
   MAE scoring under K fixed masks, or the scorer's patch embeddings for the prototype
   hardness). Only eligible samples are read (``exclude`` removed the rest); invalid
   frames by MedDEL's quality rules (``meddel.quality_checks`` and thresholds) are not
   given to SAM and are recorded as skipped with their reason. Each shard's results land
   in ``<out>/sam/<shard>.npz`` or ``sam.cache_dir`` (resume unit; a fingerprint of the
   settings guards reuse, and a cached shard is reused only when it covers every sample
   that now needs SAM).
2. The records of all ranks are all-gathered and sorted by (source key, patch index);
   with ``optidel.hardness=prototype_distance`` the patch embeddings are clustered
   (``distributed_cluster.cluster_pool``, seeded) and scored by their distance to the
   nearest centroid. Selection and mosaic assignment are pure functions of that table
   (``optidel.py``), so every rank computes the same plan.
3. Composition: mosaic shard j is written by rank j % W. Each shard is a pure function
   of the plan and the source images (fixed tar headers, lossless PNG), so the bytes do
   not depend on W — splitting composition keeps its decode/encode cost parallel instead
   of serialising it on rank 0 (``mosaic_shards.py``). Rank 0 writes the shard index
   once all are written.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from collections.abc import Mapping
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from dataeff import dist
from dataeff.constants import GENERATED_DIR, IMAGENET_MEAN, IMAGENET_STD, MAE_CKPT, QUALITY_KEYS, QUALITY_REASONS
from dataeff.data import remote
from dataeff.data.stream import iter_shard
from dataeff.files import write_atomic
from dataeff.select import manifest
from dataeff.select.compose import PATCHES_PER_MOSAIC
from dataeff.select.config import SelectConfig
from dataeff.select.distributed_cluster import cluster_pool
from dataeff.select.gallery import write_optidel_gallery
from dataeff.select.meddel import quality_reasons
from dataeff.select.mosaic_shards import Records, write_generated
from dataeff.select.optidel import assign_mosaics, budget, cluster_cap, coverage, mask_seeds, select_hardest
from dataeff.select.sam_hard import (
    RECORD_FIELDS,
    ScoreFn,
    build_sam,
    concat_records,
    extract_and_score,
    mask_pass,
)

log = logging.getLogger("dataeff")

#: Table of every SAM patch with its provenance, score, cluster and mosaic slot.
PATCHES_NAME = "patches.parquet"
QUALITY_REASONS_SET = frozenset(QUALITY_REASONS)


def pick_device(name: str) -> torch.device:
    """'auto' = the local CUDA device when there is one, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def scorer_input(batch: np.ndarray) -> torch.Tensor:
    """(B, S, S, 3) uint8 -> (B, 3, S, S) float32 normalised with ImageNet mean/std (on the CPU)."""
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    x = torch.from_numpy(np.ascontiguousarray(batch)).permute(0, 3, 1, 2).float().div_(255.0)
    return (x - mean) / std


def mae_scorer(path: str, device: torch.device, mask_seed: int, masks: int = 1) -> tuple[ScoreFn, int]:
    """Hardness = per-sample MAE reconstruction loss of the model at ``path``, mean over ``masks`` fixed masks.

    Every mask is shared by the whole batch and drawn from a fixed seed (:func:`mask_seeds`),
    so a patch's score depends on neither the batch nor the rank; the K losses are summed
    in seed order, so the mean is reproducible bit for bit.

    Returns:
        (score function on (B, S, S, 3) uint8 batches -> (B,) float32, the side S).
    """
    # Imported here, not for a cycle: it pulls in pytorch_lightning (~2 s), which only this method needs.
    from dataeff.models.mae import MAE

    mae = MAE.load_for_scoring(path, device)
    side = int(mae.encoder.patch_embed.img_size[0])
    seeds = mask_seeds(mask_seed, masks)

    def score(batch: np.ndarray) -> np.ndarray:
        x = scorer_input(batch).to(device)
        total = mae.reconstruction_loss(x, seeds[0])
        for seed in seeds[1:]:
            total = total + mae.reconstruction_loss(x, seed)
        return (total / len(seeds)).cpu().numpy() if len(seeds) > 1 else total.cpu().numpy()

    return score, side


def encoder_scorer(path: str, device: torch.device) -> tuple[ScoreFn, int]:
    """Embeddings for the prototype hardness: the scorer's encoder, unmasked, mean of its patch tokens.

    Mean of patch tokens, not CLS: MAE trains no objective on the CLS token, while every
    patch token is trained to carry its patch's content (the MAE paper finds average
    pooling as good as CLS). Rows are L2-normalised (spherical k-means, cosine distance)
    and float16, so the per-shard cache stays small.

    Returns:
        (embedding function on (B, S, S, 3) uint8 -> (B, D) float16 unit rows, the side S).
    """
    from dataeff.models.encoder import pooled_features
    from dataeff.models.mae import MAE

    mae = MAE.load_for_scoring(path, device)
    side = int(mae.encoder.patch_embed.img_size[0])

    def embed(batch: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            z = pooled_features(mae.encoder, scorer_input(batch).to(device), "mean").float()
        return torch.nn.functional.normalize(z, dim=1).cpu().numpy().astype(np.float16)

    return embed, side


def build_scorer(cfg: SelectConfig, device: torch.device) -> tuple[ScoreFn, int]:
    """The per-patch scorer ``optidel.hardness`` asks for (scores, or embeddings scored after the gather)."""
    if cfg.optidel.hardness == "prototype_distance":
        return encoder_scorer(cfg.scorer, device)
    return mae_scorer(cfg.scorer, device, cfg.optidel.mask_seed, cfg.optidel.hardness_masks)


def fingerprint(cfg: SelectConfig, scorer_path: str) -> str:
    """What a cached per-shard result depends on: SAM settings and weights file, scorer file, hardness (and its masks).

    Every ``sam.*`` key is in it (``sam.mask_pass`` and ``sam.images_per_batch`` too: the
    batched pass matches the generator within float tolerance, not bit for bit) except
    ``device`` and ``cache_dir``; a weights file counts by path, size and modification time,
    so a checkpoint replaced in place is not mistaken for the old one. The quality rules
    and the exclusion are not in it: they only decide which samples need SAM, and
    :func:`covers` checks that against the cached samples instead.
    """
    sam = {k: v for k, v in vars(cfg.sam).items() if k not in ("device", "cache_dir")}
    ckpt = Path(scorer_path)
    ckpt = ckpt / MAE_CKPT if ckpt.is_dir() else ckpt
    oc = cfg.optidel
    # K and the seed change mae_loss scores only; the prototype pass caches embeddings, which they do not touch.
    hardness = [oc.hardness, oc.mask_seed, oc.hardness_masks] if oc.hardness == "mae_loss" else [oc.hardness]
    files = [_file_id(ckpt)] + ([_file_id(Path(cfg.sam.checkpoint))] if cfg.sam.checkpoint else [])
    blob = json.dumps([sam, files, hardness], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _file_id(path: Path) -> list[str | int]:
    stat = path.stat()
    return [str(path.resolve()), stat.st_size, stat.st_mtime_ns]


def shard_plan(quality: pd.DataFrame, reasons: np.ndarray) -> tuple[dict[str, list[str]], dict[str, str]]:
    """The samples each pool tar must account for, and the invalid-frame reason of each sample.

    Shape:
        quality: N eligible index rows (key, shard, shard_dir), reasons: (N,) object ('' = valid)
        -> ({tar path: [keys]}, {key: reason}).
    """
    tars = [remote.join(d, s) for d, s in zip(quality["shard_dir"], quality["shard"], strict=True)]
    wanted: dict[str, list[str]] = {}
    for tar, key in zip(tars, quality["key"], strict=True):
        wanted.setdefault(tar, []).append(str(key))
    return wanted, {str(k): str(r) for k, r in zip(quality["key"], reasons, strict=True)}


def covers(part: Mapping[str, np.ndarray], wanted: list[str], reason: Mapping[str, str]) -> bool:
    """True when a cached shard result holds every wanted sample, and SAM saw each one that is valid now."""
    seen = set(part["image_keys"].astype(str).tolist())
    if not set(wanted) <= seen:
        return False
    skipped = dict(zip(part["skipped_keys"].astype(str), part["skipped_reasons"].astype(str), strict=True))
    valid_now = {k for k in wanted if not reason.get(k)}
    # A sample skipped for quality then (not given to SAM) that is valid now needs SAM.
    return not any(skipped.get(k) in QUALITY_REASONS_SET for k in valid_now)


def restrict(part: Mapping[str, np.ndarray], wanted: list[str], reason: Mapping[str, str]) -> dict[str, Any]:
    """A shard result cut to the wanted samples, under the current invalid-frame reasons.

    Samples no longer wanted (excluded) disappear; a now-invalid sample loses its patches
    and is skipped with its quality reason; the rest keep their cached SAM outcome.
    """
    keep = set(wanted)
    img_keys = part["image_keys"].astype(str)
    img = np.isin(img_keys, np.array(sorted(keep), dtype=str))
    sources = part["source"].astype(str)
    usable = np.array([s in keep and not reason.get(s) for s in sources], dtype=bool)
    out: dict[str, Any] = {name: part[name][usable] for name in RECORD_FIELDS if name in part}
    old = dict(zip(part["skipped_keys"].astype(str), part["skipped_reasons"].astype(str), strict=True))
    skipped = [(k, reason.get(k) or old[k]) for k in img_keys[img] if reason.get(k) or k in old]
    out.update(
        image_keys=img_keys[img],
        image_scores=part["image_scores"][img],
        skipped_keys=np.array([k for k, _ in skipped], dtype=str),
        skipped_reasons=np.array([r for _, r in skipped], dtype=str),
        sam_s=part["sam_s"],
        score_s=part["score_s"],
    )
    return out


def extract_owned(
    wanted: dict[str, list[str]], reason: dict[str, str], cfg: SelectConfig, rank: int, world: int
) -> list[dict[str, Any]]:
    """SAM patches + hardness of the shards this rank owns (i % W == rank), resuming finished ones.

    Args:
        wanted: pool tar -> the eligible keys in it (``shard_plan``); tars in sorted order.
        reason: key -> invalid-frame reason ('' = valid): invalid frames are not given to SAM.
    """
    tars = sorted(wanted)
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
                cached = {name: z[name] for name in z.files}
            if str(cached["fingerprint"]) == stamp and covers(cached, wanted[tar], reason):
                parts.append(restrict(cached, wanted[tar], reason))
                continue
            log.info("%s was made with other settings or for other samples; redoing it", path)
        todo.append((tar, path))
    if not todo:
        return parts
    device = pick_device(cfg.sam.device)
    masks = mask_pass(build_sam(cfg.sam, device), cfg.sam)
    score_fn, side = build_scorer(cfg, device)
    total = sum(len(wanted[t]) for t, _ in todo)
    with tqdm(total=total, unit="img", desc="optidel sam+score", disable=rank != 0, smoothing=0.1) as bar:
        for tar, path in todo:
            keys = set(wanted[tar])
            samples = ((s["key"], np.asarray(s["image"], dtype=np.uint8)) for s in iter_shard(tar, keys))
            skip = {k: reason[k] for k in keys if reason.get(k)}
            part = extract_and_score(
                samples, masks, cfg.sam, side, score_fn, cfg.optidel.batch_size, lambda: bar.update(1), skip
            )
            write_atomic(path, partial(_save_part, stamp=stamp, part=part), keep_suffix=True)
            parts.append(restrict(part, wanted[tar], reason))
    return parts


def _save_part(tmp: Path, stamp: str, part: dict[str, Any]) -> None:
    # keep_suffix: np.savez appends ".npz" to a name without it.
    np.savez(tmp, fingerprint=np.array(stamp), **part)


def merge_parts(parts: list[dict[str, Any]]) -> tuple[Records, dict[str, Any]]:
    """All ranks' shard results -> (patch records sorted by (source, index), per-image arrays sorted by key)."""
    rec = concat_records(parts)
    order = np.lexsort((rec["index"], rec["source"]))
    rec = {k: v[order] for k, v in rec.items()}
    cat: dict[str, np.ndarray] = {}
    for n in ("image_keys", "image_scores", "skipped_keys", "skipped_reasons"):
        # Zero-row parts are left out: their (0,) arrays do not stack with (n, D) embeddings.
        arrays = [p[n] for p in parts if len(p[n])]
        cat[n] = np.concatenate(arrays) if arrays else np.zeros(0, np.float32 if n == "image_scores" else str)
    order = np.argsort(cat["image_keys"], kind="stable")
    scores = cat["image_scores"][order]
    images: dict[str, Any] = {
        "keys": cat["image_keys"][order].astype(str),
        "scores": scores if scores.ndim == 2 else scores.astype(np.float32),
    }
    images["skipped"] = dict(zip(cat["skipped_keys"].astype(str), cat["skipped_reasons"].astype(str), strict=False))
    images["sam_s"] = float(sum(float(p["sam_s"]) for p in parts))
    images["score_s"] = float(sum(float(p["score_s"]) for p in parts))
    return rec, images


def run_optidel(
    emb: np.ndarray, keys: np.ndarray | None, quality: pd.DataFrame | None, cfg: SelectConfig, rank: int, world: int
) -> manifest.Decisions:
    """OptiDEL for the select stage: same decisions on every rank, mosaics in ``<out>/generated``.

    Shape:
        emb: (N, D) float16, keys: (N,) sorted; quality: the pool's ok index rows aligned to keys
        (required: they locate each image's shard).
    """
    if quality is None:
        raise ValueError("optidel needs the pool's index rows (shard, shard_dir) to read the images")
    assert keys is not None, "optidel is in methods.READS_KEYS: every rank holds the keys"
    oc = cfg.optidel
    timings: dict[str, float] = {}
    labels, _, k = cluster_pool(emb, cfg.cluster, cfg.seed, rank, world, timings)
    # The invalid-frame rule is MedDEL's, thresholds included, so both methods agree on "invalid".
    has_quality = not quality[list(QUALITY_KEYS)].isna().all().all()
    qreason = quality_reasons(quality, cfg.meddel) if has_quality else np.full(len(keys), "", dtype=object)
    wanted, reason_of = shard_plan(quality, qreason)
    parts = extract_owned(wanted, reason_of, cfg, rank, world)
    rec, images = merge_parts([p for rank_parts in dist.all_gather_object(parts) for p in rank_parts])
    timings.update(sam=images["sam_s"], score=images["score_s"])
    if not np.array_equal(images["keys"], keys):
        raise RuntimeError("SAM pass saw a different set of samples than the index lists; re-run 'dataeff shard'")
    valid = qreason == ""
    proto: dict[str, Any] = {}
    if oc.hardness == "prototype_distance":
        t = time.time()
        rec["score"], proto["prototypes_patches"] = prototype_hardness(rec["score"], cfg, rank, world)
        image_scores = np.full(len(keys), np.nan, dtype=np.float32)
        image_scores[valid], proto["prototypes_originals"] = prototype_hardness(
            images["scores"][valid], cfg, rank, world
        )
        images["scores"] = image_scores
        timings["prototypes"] = time.time() - t
    # Invalid frames are no candidates as originals either: they have no hardness (NaN in the manifest).
    images["scores"] = np.where(valid, images["scores"], np.nan).astype(np.float32)

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
        rows = np.flatnonzero(valid)
        picked, _ = select_hardest(
            images["scores"][rows], keys[rows], labels[rows], n_orig, 1, cluster_cap(n_orig, k, oc.cluster_cap_factor)
        )
        orig_kept[rows[picked]] = True

    t = time.time()
    run = _safe(Path(cfg.out).resolve().name)
    tar_of = dict(
        zip(
            quality["key"],
            (remote.join(d, s) for d, s in zip(quality["shard_dir"], quality["shard"], strict=False)),
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
    info.update(proto, quality_checks=list(cfg.meddel.quality_checks) if has_quality else [])
    info.update(
        mosaics=int(len(groups)), originals=int(orig_kept.sum()), timings_s={a: round(b, 3) for a, b in timings.items()}
    )
    if rank == 0:
        _write_patch_table(Path(cfg.out), rec, cl, selected, groups, gen["key"].to_numpy())
        if cfg.report.gallery:
            label = "MAE loss" if oc.hardness == "mae_loss" else "prototype distance"
            pngs = write_optidel_gallery(
                cfg.out, rec, selected, groups, gen["key"].tolist(), tar_of, cfg.report.per_sheet, label
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


def prototype_hardness(x: np.ndarray, cfg: SelectConfig, rank: int, world: int) -> tuple[np.ndarray, int]:
    """Sorscher et al. 2022's prototype metric: cosine distance to the nearest k-means centroid.

    Spherical faiss k-means over all rows with k = round(sqrt(rows)) (``cluster.k`` is the
    pool's and is not used here), seeded by ``seed`` and trained on ``cluster``'s seeded
    sample; the rows are the gathered, key-sorted table, so the result is the same on
    every rank and for any world size.

    Shape:
        x: (P, D) float16 unit rows -> (hardness (P,) float32 in [0, 2], k); k = 0 below 2 rows.
    """
    if len(x) < 2:
        return np.zeros(len(x), dtype=np.float32), 0
    timings: dict[str, float] = {}
    _, sims, k = cluster_pool(
        np.asarray(x, dtype=np.float16), dataclasses.replace(cfg.cluster, k=0), cfg.seed, rank, world, timings
    )
    return (1.0 - sims.astype(np.float32)).astype(np.float32), int(k)


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
        "hardness": cfg.optidel.hardness,
        **({"hardness_masks": cfg.optidel.hardness_masks} if cfg.optidel.hardness == "mae_loss" else {}),
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
        "mean_hardness_originals_all": (
            float(np.nanmean(images["scores"])) if np.isfinite(images["scores"]).any() else float("nan")
        ),
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
