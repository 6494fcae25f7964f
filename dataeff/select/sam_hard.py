"""SAM patches for OptiDEL: build Segment Anything, turn its automatic masks into patch records.

PAPERS.md, OptiDEL step 1: run SAM's automatic mask generator on each image, crop the
bounding box of every mask ("patches with potential lesions"), drop tiny and near-full
masks. Each crop is resized to the scorer's input side for its hardness score, and to
a quarter of its mosaic (half the image size per side) when composed. A patch is stored as its provenance
(source key, box, mask area, predicted IoU, stability) plus its hardness score; its
pixels are a deterministic function of the source image and the box
(:func:`dataeff.select.compose.crop_patch`), so they are cropped again when mosaics are
composed (``mosaic_shards.py``) rather than stored (16 crops per image would outweigh
the pool itself). SAM runs as ``sam.mask_pass`` says: the batched fast pass
(``sam_batch.py``, the default) or SAM's own generator one image at a time; both give
the same masks.

The official checkpoints are never downloaded. ``sam.model=tiny`` builds a tiny randomly
initialised SAM (tests and the CPU demo only; results made with it are labelled).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dataeff.config import ConfigError, option
from dataeff.select.compose import crop_patch
from dataeff.select.sam_batch import BatchedMaskPass, MaskPass, OneImageAtATime

log = logging.getLogger("dataeff")

#: Official checkpoints, from the segment-anything README ("Model Checkpoints").
SAM_CHECKPOINTS = {
    "vit_h": "sam_vit_h_4b8939.pth",
    "vit_l": "sam_vit_l_0b3195.pth",
    "vit_b": "sam_vit_b_01ec64.pth",
}
SAM_URL = "https://dl.fbaipublicfiles.com/segment_anything/"
SAM_MODELS = (*SAM_CHECKPOINTS, "tiny")
MASK_PASSES = ("batched", "generator")

#: Fields of one patch record; every array has one row per patch.
RECORD_FIELDS = ("source", "index", "box", "area", "area_frac", "pred_iou", "stability", "score")


@dataclass
class SamConfig:
    """Segment Anything and its automatic mask generator (generator defaults: ours, PAPERS.md)."""

    checkpoint: str = option(
        "", help="local SAM checkpoint (.pth, e.g. sam_vit_b_01ec64.pth); required unless sam.model=tiny"
    )
    model: str = option(
        "vit_b", help="SAM image encoder: vit_b, vit_l, vit_h, or tiny (random 2-block SAM, tests/demo only)"
    )
    points_per_side: int = option(32, help="prompt grid side; points_per_side^2 point prompts per image")
    points_per_batch: int = option(64, help="point prompts per mask-decoder forward pass (memory vs speed)")
    mask_pass: str = option(
        "batched",
        help="'batched': the image encoder over sam.images_per_batch images per forward, masks reduced to boxes "
        "on the device (same masks, faster); 'generator': SamAutomaticMaskGenerator one image at a time (reference)",
    )
    images_per_batch: int = option(4, help="images per SAM image-encoder forward (sam.mask_pass=batched)")
    pred_iou_thresh: float = option(0.88, help="drop masks whose predicted IoU is below this")
    stability_score_thresh: float = option(0.92, help="drop masks whose stability score is below this")
    box_nms_thresh: float = option(0.7, help="box IoU above which duplicate masks are suppressed")
    min_area_frac: float = option(0.01, help="drop masks covering less than this fraction of the image (tiny)")
    max_area_frac: float = option(0.8, help="drop masks covering more than this fraction of the image (near-full)")
    min_box_side: int = option(8, help="drop masks whose bounding box is narrower or shorter than this, px")
    max_masks_per_image: int = option(16, help="keep at most this many masks per image, highest predicted IoU first")
    seed: int = option(0, help="initialisation seed of the tiny SAM")
    device: str = option("auto", help="'auto' (cuda when present), 'cpu' or 'cuda'")
    cache_dir: str = option(
        "",
        help="per-shard SAM + hardness cache ('' = <out>/sam); a sweep's cells can share one, "
        "entries made with other settings are redone",
    )

    def __post_init__(self) -> None:
        if self.model not in SAM_MODELS:
            raise ConfigError(f"sam.model={self.model!r}: choose one of {', '.join(SAM_MODELS)}")
        if self.points_per_side < 1 or self.points_per_batch < 1 or self.images_per_batch < 1:
            raise ConfigError("sam.points_per_side, sam.points_per_batch and sam.images_per_batch must be at least 1")
        if self.mask_pass not in MASK_PASSES:
            raise ConfigError(f"sam.mask_pass={self.mask_pass!r}: choose one of {', '.join(MASK_PASSES)}")
        if not 0.0 <= self.min_area_frac < self.max_area_frac <= 1.0:
            raise ConfigError(
                f"sam.min_area_frac={self.min_area_frac}, sam.max_area_frac={self.max_area_frac}: "
                "need 0 <= min_area_frac < max_area_frac <= 1"
            )
        if self.max_masks_per_image < 1:
            raise ConfigError(f"sam.max_masks_per_image={self.max_masks_per_image}: must be at least 1")


def check_checkpoint(cfg: SamConfig) -> None:
    """Fail before any work when a real SAM is asked for without a local checkpoint.

    Raises:
        ConfigError: naming the file to download and where to put it.
    """
    if cfg.model == "tiny":
        return
    name = SAM_CHECKPOINTS[cfg.model]
    if not cfg.checkpoint:
        raise ConfigError(
            f"method=optidel needs a Segment Anything checkpoint and none is given (nothing is downloaded). "
            f"Download the official {cfg.model} checkpoint {name} from {SAM_URL}{name} "
            f"(listed in the segment-anything README), put it anywhere local, e.g. checkpoints/{name}, and pass "
            f"sam.checkpoint=checkpoints/{name} (sam.model=vit_l/vit_h take sam_vit_l_0b3195.pth/sam_vit_h_4b8939.pth). "
            "sam.model=tiny runs a tiny random SAM for tests and the CPU demo only."
        )
    if not Path(cfg.checkpoint).is_file():
        raise ConfigError(f"sam.checkpoint={cfg.checkpoint}: no such file (expected the official {name})")


def build_tiny_sam(seed: int = 0) -> torch.nn.Module:
    """A tiny randomly initialised SAM: image encoder 2 blocks x 64 wide at 256 px (~0.2M params).

    Its masks are meaningless; it exists so the whole OptiDEL path runs in seconds on CPU.
    """
    from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

    side, patch, dim = 256, 16, 32
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        sam = Sam(
            image_encoder=ImageEncoderViT(
                img_size=side,
                patch_size=patch,
                embed_dim=64,
                depth=2,
                num_heads=2,
                mlp_ratio=4.0,
                out_chans=dim,
                qkv_bias=True,
                norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
                use_rel_pos=True,
                window_size=4,
                global_attn_indexes=(1,),
            ),
            prompt_encoder=PromptEncoder(
                embed_dim=dim,
                image_embedding_size=(side // patch, side // patch),
                input_image_size=(side, side),
                mask_in_chans=4,
            ),
            mask_decoder=MaskDecoder(
                num_multimask_outputs=3,
                transformer=TwoWayTransformer(depth=1, embedding_dim=dim, mlp_dim=64, num_heads=2),
                transformer_dim=dim,
                iou_head_depth=2,
                iou_head_hidden_dim=32,
            ),
            pixel_mean=[123.675, 116.28, 103.53],
            pixel_std=[58.395, 57.12, 57.375],
        )
    finally:
        # Building a test model must not shift the caller's global random stream.
        torch.random.set_rng_state(generator_state)
    return sam.eval()


def build_sam(cfg: SamConfig, device: torch.device, allow_random_init: bool = False) -> torch.nn.Module:
    """The SAM named by ``cfg.model``, weights from ``cfg.checkpoint``, in eval mode on ``device``.

    ``allow_random_init`` (benchmarks only) builds a real-size SAM without weights. The tiny
    SAM is seeded by ``cfg.seed``, or loads ``cfg.checkpoint`` when one is given.
    """
    from segment_anything import sam_model_registry

    if cfg.model == "tiny":
        sam = build_tiny_sam(cfg.seed)
    else:
        if not (allow_random_init and not cfg.checkpoint):
            check_checkpoint(cfg)
        sam = sam_model_registry[cfg.model](checkpoint=None)
    if cfg.checkpoint:
        if not Path(cfg.checkpoint).is_file():
            raise ConfigError(f"sam.checkpoint={cfg.checkpoint}: no such file")
        # weights_only: a checkpoint is data, never code (SAM's own loader unpickles freely).
        sam.load_state_dict(torch.load(cfg.checkpoint, map_location="cpu", weights_only=True))
    return sam.eval().to(device)


def mask_pass(sam: torch.nn.Module, cfg: SamConfig) -> MaskPass:
    """The SAM pass ``sam.mask_pass`` names, with the configured prompts and thresholds."""
    if cfg.mask_pass == "generator":
        return OneImageAtATime(mask_generator(sam, cfg))
    return BatchedMaskPass(sam, images_per_batch=cfg.images_per_batch, **_prompts(cfg))


def _prompts(cfg: SamConfig) -> dict[str, Any]:
    """The prompt grid and mask filters, named as both passes take them."""
    return {
        "points_per_side": cfg.points_per_side,
        "points_per_batch": cfg.points_per_batch,
        "pred_iou_thresh": cfg.pred_iou_thresh,
        "stability_score_thresh": cfg.stability_score_thresh,
        "box_nms_thresh": cfg.box_nms_thresh,
    }


def mask_generator(sam: torch.nn.Module, cfg: SamConfig) -> Any:
    """SAM's automatic mask generator with the configured thresholds (one image per call)."""
    from segment_anything import SamAutomaticMaskGenerator

    return SamAutomaticMaskGenerator(sam, **_prompts(cfg))


def filter_masks(masks: list[dict], height: int, width: int, cfg: SamConfig) -> dict[str, np.ndarray]:
    """Usable masks of one image as arrays, best predicted IoU first.

    Boxes become end-exclusive ``(x0, y0, x1, y1)`` (SAM's XYWH box has inclusive ends).

    Returns:
        ``box`` (K, 4) int32, ``area`` (K,) int64, ``area_frac``, ``pred_iou``, ``stability`` (K,) float32.
    """
    rows = []
    for m in masks:
        x, y, w, h = (int(round(v)) for v in m["bbox"])
        box = (max(0, x), max(0, y), min(width, x + w + 1), min(height, y + h + 1))
        frac = float(m["area"]) / float(height * width)
        if not cfg.min_area_frac <= frac <= cfg.max_area_frac:
            continue
        if min(box[2] - box[0], box[3] - box[1]) < cfg.min_box_side:
            continue
        rows.append((-float(m["predicted_iou"]), -float(m["stability_score"]), box, int(m["area"]), frac))
    rows.sort()  # deterministic: by IoU, then stability, then box
    rows = rows[: cfg.max_masks_per_image]
    return {
        "box": np.array([r[2] for r in rows], dtype=np.int32).reshape(-1, 4),
        "area": np.array([r[3] for r in rows], dtype=np.int64),
        "area_frac": np.array([r[4] for r in rows], dtype=np.float32),
        "pred_iou": np.array([-r[0] for r in rows], dtype=np.float32),
        "stability": np.array([-r[1] for r in rows], dtype=np.float32),
    }


#: (B, S, S, 3) uint8 -> (B,) hardness scores, or (B, D) embeddings when the hardness is computed
#: later over the whole pool (``optidel.hardness=prototype_distance``).
ScoreFn = Callable[[np.ndarray], np.ndarray]


class _BatchScorer:
    """Scores arrays in consecutive fixed-size batches as they arrive (bounded memory).

    Keeps the scorer's trailing shape ((B,) scores or (B, D) embeddings) and float16
    results as float16 (embeddings are stored compactly); anything else becomes float32.
    """

    def __init__(self, score_fn: ScoreFn, batch_size: int) -> None:
        self.score_fn, self.batch_size = score_fn, batch_size
        self.pending: list[np.ndarray] = []
        self.scores: list[np.ndarray] = []
        self.seconds = 0.0

    def add(self, array: np.ndarray) -> None:
        self.pending.append(array)
        if len(self.pending) >= self.batch_size:
            self._flush()

    def _flush(self) -> None:
        t0 = time.perf_counter()
        out = np.asarray(self.score_fn(np.stack(self.pending)))
        out = out if out.dtype == np.float16 else out.astype(np.float32)
        self.scores.append(out.reshape(len(self.pending), *out.shape[1:]))
        self.seconds += time.perf_counter() - t0
        self.pending = []

    def finish(self) -> np.ndarray:
        if self.pending:
            self._flush()
        return np.concatenate(self.scores) if self.scores else np.zeros(0, np.float32)


def extract_and_score(
    samples: Iterable[tuple[str, np.ndarray]],
    masks: MaskPass,
    cfg: SamConfig,
    score_size: int,
    score_fn: ScoreFn,
    batch_size: int,
    on_image: Callable[[], None] = lambda: None,
    skip: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """SAM patches of a sequence of images (one shard) with their hardness scores.

    Images reach SAM ``masks.images_per_batch`` at a time. Patches are scored in
    consecutive batches of ``batch_size`` in sample order, so the scores depend only on
    the shard, never on the number of ranks or on SAM's image batch. Every image also gets
    a whole-image score (the hardness of the original, for ``include_originals``).

    Args:
        samples: ``(key, image)`` pairs, image (H, W, 3) uint8.
        masks: the SAM pass (:func:`mask_pass`).
        score_size: side S the scorer takes; each crop (and each whole image) is resized to it.
        score_fn: (B, S, S, 3) uint8 -> (B,) float32 hardness (higher = harder), or (B, D)
            embeddings; ``score``/``image_scores`` then hold (P, D)/(N, D) rows.
        skip: key -> reason for images that must not reach SAM (invalid frames, e.g. "dark");
            they are recorded as skipped with that reason, like an image SAM finds no mask in,
            and yield no patch. Their whole image is still scored, so the image arrays stay
            aligned with the samples.

    Returns:
        the patch record arrays (:data:`RECORD_FIELDS`), ``image_keys``/``image_scores``,
        ``skipped_keys``/``skipped_reasons`` and ``sam_s``/``score_s`` timings.
    """
    parts: list[dict[str, np.ndarray]] = []
    patch_scorer, image_scorer = _BatchScorer(score_fn, batch_size), _BatchScorer(score_fn, batch_size)
    image_keys, skipped, reasons = [], [], []
    sam_s = 0.0
    # Images wait here in sample order (skipped ones as their reason) until a SAM batch is full.
    pending: list[tuple[str, np.ndarray | str]] = []

    def flush() -> None:
        nonlocal sam_s
        batch = [item for _, item in pending if isinstance(item, np.ndarray)]
        t0 = time.perf_counter()
        results = iter(masks.generate_batch(batch) if batch else [])
        sam_s += time.perf_counter() - t0
        for key, item in pending:
            on_image()
            if isinstance(item, str):
                skipped.append(key)
                reasons.append(item)
                continue
            result = next(results)
            if isinstance(result, Exception):  # one bad image must not end the job
                log.warning("SAM failed on %s: %s", key, result)
                found_masks, reason = [], f"sam_error:{type(result).__name__}"
            else:
                found_masks, reason = result, "sam_no_mask"
            found = filter_masks(found_masks, item.shape[0], item.shape[1], cfg)
            if len(found["box"]) == 0:
                skipped.append(key)
                reasons.append(reason if not found_masks else "sam_masks_filtered")
                continue
            found["source"] = np.array([key] * len(found["box"]))
            found["index"] = np.arange(len(found["box"]), dtype=np.int32)
            parts.append(found)
            for box in found["box"]:
                patch_scorer.add(crop_patch(item, box, score_size))
        pending.clear()

    to_sam = 0
    for key, image in samples:
        h, w = image.shape[:2]
        image_keys.append(key)
        image_scorer.add(crop_patch(image, (0, 0, w, h), score_size))
        reason = skip.get(key, "") if skip else ""
        pending.append((key, reason or image))
        to_sam += not reason
        if to_sam == masks.images_per_batch:
            flush()
            to_sam = 0
    flush()
    out: dict[str, Any] = dict(concat_records(parts))
    out["score"] = patch_scorer.finish()
    assert len(out["score"]) == len(out["source"])
    out.update(
        image_keys=np.array(image_keys, dtype=str),
        image_scores=image_scorer.finish(),
        skipped_keys=np.array(skipped, dtype=str),
        skipped_reasons=np.array(reasons, dtype=str),
        sam_s=np.float64(sam_s),
        score_s=np.float64(patch_scorer.seconds + image_scorer.seconds),
    )
    return out


def concat_records(parts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Join patch record arrays (fields missing from a part are skipped); empty parts give empty arrays."""
    empty = {
        "source": np.zeros(0, dtype=str),
        "index": np.zeros(0, np.int32),
        "box": np.zeros((0, 4), np.int32),
        "area": np.zeros(0, np.int64),
        "area_frac": np.zeros(0, np.float32),
        "pred_iou": np.zeros(0, np.float32),
        "stability": np.zeros(0, np.float32),
        "score": np.zeros(0, np.float32),
    }
    out = {}
    for name, default in empty.items():
        # Zero-row parts are left out: an empty score array is (0,) even when the others hold (P, D) embeddings.
        arrays = [p[name] for p in parts if name in p and len(p[name])]
        out[name] = np.concatenate(arrays) if arrays else default
    if not any("score" in p for p in parts):
        del out["score"]
    return out
