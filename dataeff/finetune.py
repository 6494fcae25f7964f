"""``dataeff finetune``: fine-tune a segmentation model on a pre-trained ViT encoder, report mIoU.

Shell only: the model and loss live in :mod:`dataeff.models.segment`, the Lightning
module (validation across ranks, best weights) in :mod:`dataeff.finetune_module`, the
optimiser and schedule in :mod:`dataeff.optim`, the scores in :mod:`dataeff.metrics`, the
Trainer (strategy, loggers, checkpoints) in :mod:`dataeff.trainer`, the pairs and split
in :class:`dataeff.data.datamodules.SegmentationDataModule`.

Flow: train on the train split; validate on the val split (at the training size) and keep
the weights of the best val mIoU; evaluate those on the test split at each mask's native
resolution (logits upsampled bilinearly from the input size before the argmax) — each
rank scores a disjoint share (no sampler padding), confusion matrices are summed and the
per-image rows gathered — and write ``results.json``, ``per_image.csv``,
``predictions.png``, ``model.safetensors`` and ``config.yaml`` under ``out``. A run whose
``results.json`` exists is skipped; an interrupted one resumes from its newest checkpoint.

From-scratch reference: ``encoder.weights=""`` with ``encoder.allow_random_init=true``
fine-tunes a randomly initialised encoder of the configured shape; ``seed`` sets its init
(and the head's), and ``results.json`` says ``"encoder": "random-init"``.
"""

from __future__ import annotations

import csv
import io
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from safetensors.torch import load_file
from torch.utils.data import DataLoader

from dataeff import dist, outputs, provenance
from dataeff.checkpoints import safetensors_save
from dataeff.config import (
    ConfigError,
    EncoderConfig,
    TrainerConfig,
    WandbConfig,
    option,
    section,
    to_dict,
)
from dataeff.constants import (
    BEST_WEIGHTS,
    CHECKPOINT_DIR,
    FINETUNE_FORMAT,
    IMAGENET_MEAN,
    IMAGENET_STD,
    PER_IMAGE_NAME,
    RESULTS_NAME,
    SPLIT_NAME,
)
from dataeff.data import downstream
from dataeff.data.datamodules import SegmentationDataConfig, SegmentationDataModule
from dataeff.encoder_check import check_encoder
from dataeff.files import file_sha256, read_json, save_resolved, write_atomic, write_json_atomic
from dataeff.finetune_module import SegmentationModule
from dataeff.input_checks import check_downstream
from dataeff.lock import locked
from dataeff.metrics import (
    confusion_matrix,
    foreground_dice_iou,
    json_safe,
    normdel,
    per_image_summary,
    segmentation_scores,
)
from dataeff.models.encoder import build_encoder, model_kwargs, resolve
from dataeff.models.segment import SegmentationModel, predict_batches, predict_native_batches
from dataeff.trainer import build_trainer, check_layout, close_loggers, find_resume_checkpoint

log = logging.getLogger("dataeff")


@dataclass
class HeadConfig:
    """The multi-level progressive-upsampling head (SETR-MLA-like)."""

    n_levels: int = option(4, help="encoder depths fed to the head, evenly spaced, last block included")
    channels: int = option(128, help="width of each head stream")

    def __post_init__(self) -> None:
        if self.n_levels < 1 or self.channels < 1:
            raise ConfigError("head.n_levels and head.channels must be at least 1")


@dataclass
class FinetuneOptimConfig:
    """AdamW with linear warm-up then cosine decay, optional layer-wise lr decay."""

    lr: float = option(1e-4, help="peak learning rate (head; encoder blocks get it times layer decay)")
    weight_decay: float = option(0.05, help="AdamW weight decay (not on norms, biases, tokens)")
    layer_decay: float = option(0.75, help="layer-wise lr decay per encoder block (1.0 = off; BEiT/MAE recipe)")
    warmup_steps: int = option(100, help="linear warm-up steps")
    min_lr_ratio: float = option(0.01, help="final lr as a fraction of the peak")
    dice_weight: float = option(1.0, help="loss = cross-entropy + dice_weight x soft Dice (0 = CE only)")

    def __post_init__(self) -> None:
        if self.lr <= 0 or self.weight_decay < 0:
            raise ConfigError("optim.lr must be > 0 and optim.weight_decay >= 0")
        if not 0.0 < self.layer_decay <= 1.0:
            raise ConfigError(f"optim.layer_decay={self.layer_decay}: must be in (0, 1] (1.0 turns it off)")
        if self.warmup_steps < 0 or not 0.0 <= self.min_lr_ratio <= 1.0 or self.dice_weight < 0:
            raise ConfigError("optim.warmup_steps >= 0, optim.min_lr_ratio in [0, 1], optim.dice_weight >= 0")


@dataclass
class FinetuneConfig:
    """``dataeff finetune``: segmentation fine-tuning of a pre-trained encoder on a downstream set."""

    encoder: EncoderConfig = section(
        EncoderConfig, help="the pre-trained encoder (encoder=<path> sets encoder.weights)"
    )
    data: SegmentationDataConfig = section(
        SegmentationDataConfig, help="downstream image/mask pairs, split, augmentation"
    )
    head: HeadConfig = section(HeadConfig, help="segmentation head")
    optim: FinetuneOptimConfig = section(FinetuneOptimConfig, help="optimiser, schedule and loss weights")
    trainer: TrainerConfig = section(TrainerConfig, help="steps, strategy, precision, checkpoints")
    wandb: WandbConfig = section(WandbConfig, help="W&B logging (offline unless WANDB_MODE is set)")
    out: str = option("runs/finetune", help="run directory (results.json, predictions.png, checkpoints, logs)")
    seed: int = option(
        0, help="seeds the head init (and the encoder's when it is randomly initialised) and the data order"
    )
    run_name: str = option("", help="W&B run name (default: the name of out)")
    val_every_n_steps: int = option(0, help="validate every N optimiser steps (0 = after every epoch)")
    class_names: list = option([], help="class names for results.json (default: background, class_1, ...)")
    n_predictions: int = option(6, help="test cases drawn in predictions.png")
    freeze_encoder: bool = option(
        False, help="train the head only on a frozen encoder (frozen-encoder evaluation of the pre-training)"
    )
    keep_checkpoints: bool = option(
        False, help="keep out/checkpoints after a successful run (they hold optimiser state)"
    )
    overwrite: bool = option(
        False, help="start afresh in an out holding a run (or checkpoints) of another config or other inputs"
    )

    def __post_init__(self) -> None:
        if self.class_names and len(self.class_names) != self.data.num_classes:
            raise ConfigError(
                f"class_names has {len(self.class_names)} names but data.num_classes={self.data.num_classes}"
            )
        if self.val_every_n_steps < 0 or self.n_predictions < 0:
            raise ConfigError("val_every_n_steps and n_predictions must be >= 0")
        if self.optim.warmup_steps >= self.trainer.max_steps:
            raise ConfigError(
                f"optim.warmup_steps={self.optim.warmup_steps} >= trainer.max_steps={self.trainer.max_steps}: "
                "lower the warm-up (e.g. 5-10% of the steps)"
            )


def class_names(cfg: FinetuneConfig) -> list[str]:
    if cfg.class_names:
        return [str(n) for n in cfg.class_names]
    return ["background"] + [f"class_{i}" for i in range(1, cfg.data.num_classes)]


def build_model(cfg: FinetuneConfig) -> SegmentationModel:
    """Encoder (weights loaded, resized to ``data.image_size``) + head, initialised from ``cfg.seed``.

    The init draws from a generator seeded here (the global one is restored after), so the
    same seed gives the same head — and, for a from-scratch reference, the same random
    encoder — whatever ran before.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        return _build_model(cfg)


def _build_model(cfg: FinetuneConfig) -> SegmentationModel:
    encoder = build_encoder(cfg.encoder)
    size = cfg.data.image_size
    if tuple(encoder.patch_embed.img_size) != (size, size):
        # Position embeddings are interpolated, as when fine-tuning at a new resolution (ViT paper, Sec. 3.2).
        log.info("finetune: encoder built for %s px, resized to %d px", tuple(encoder.patch_embed.img_size), size)
        encoder.set_input_size(img_size=(size, size))
    if size % encoder.patch_embed.patch_size[0]:
        raise ConfigError(
            f"data.image_size={size} is not a multiple of the encoder patch size {encoder.patch_embed.patch_size[0]}"
        )
    model = SegmentationModel(encoder, cfg.data.num_classes, cfg.head.n_levels, cfg.head.channels)
    if cfg.freeze_encoder:  # frozen parameters get no gradient, and param_groups leaves them out of the optimiser
        model.encoder.requires_grad_(False)
    return model


def evaluate_share(
    model: torch.nn.Module, pairs: list, cfg: SegmentationDataConfig, rank: int, world_size: int, device: torch.device
) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """Test scores of this rank's share (every ``world_size``-th pair from ``rank``) of ``pairs``.

    Scored at each mask's native resolution: the model sees the image resized to
    ``cfg.image_size``, its logits are upsampled bilinearly to the mask's size before the
    argmax, and every native pixel is counted. Summing the matrices (and joining the rows)
    of all ranks gives the whole set's, each pair counted once.

    Returns:
        ``(confusion, rows)``: the confusion matrix and one row per image,
        ``{"file", "dice", "iou", "both_empty"}`` (foreground Dice/IoU, see ``metrics``).

    Shape:
        confusion: (C, C) int64, rows = target, columns = prediction
    """
    share = pairs[rank::world_size]
    cm = torch.zeros(cfg.num_classes, cfg.num_classes, dtype=torch.long)
    rows: list[dict[str, Any]] = []
    if not share:
        return cm.numpy(), rows
    dataset = downstream.SegmentationDataset(
        share, downstream.JointTransform(cfg.image_size, train=False), cfg.num_classes, native=True
    )
    loader = DataLoader(
        dataset,
        batch_size=cfg.batch_size,
        shuffle=False,
        num_workers=cfg.num_workers,
        collate_fn=downstream.collate_native,
    )
    for batch, preds in predict_native_batches(model, loader, device):
        for pred, mask, name in zip(preds, batch["native_mask"], batch["file"], strict=True):
            cm += confusion_matrix(pred, mask, cfg.num_classes)
            dice, iou = foreground_dice_iou(pred, mask)
            rows.append({"file": name, "dice": dice, "iou": iou, "both_empty": not (pred.any() or mask.any())})
    return cm.numpy(), rows


def per_image_csv(rows: list[dict[str, Any]]) -> str:
    """``per_image.csv`` text: ``file,dice,iou``, one line per test image, sorted by file."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["file", "dice", "iou"])
    for row in sorted(rows, key=lambda r: r["file"]):
        writer.writerow([row["file"], f"{row['dice']:.6f}", f"{row['iou']:.6f}"])
    return buf.getvalue()


def encoder_record(cfg: EncoderConfig) -> dict[str, Any]:
    """What results.json says about the encoder: ``random-init`` or the weights and their sha256, and the shape."""
    enc = resolve(cfg)
    return {
        "encoder": enc.weights or "random-init",
        "encoder_sha256": file_sha256(enc.weights) if enc.weights else None,
        "encoder_arch": {"name": enc.name, **model_kwargs(enc)},
    }


# Class colours for overlays (class 0 = background is left transparent).
_PALETTE = np.array(
    [
        [0, 0, 0],
        [0, 220, 90],
        [255, 60, 60],
        [60, 140, 255],
        [255, 200, 0],
        [200, 80, 255],
        [0, 220, 220],
        [255, 128, 0],
    ],
    dtype=np.float32,
)


def overlay(image: np.ndarray, mask: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """Blend class colours over an RGB image; background pixels stay untouched.

    Shape:
        image: (H, W, 3) float in [0, 1], mask: (H, W) int -> (H, W, 3) float in [0, 1]
    """
    colours = _PALETTE[np.asarray(mask) % len(_PALETTE)] / 255.0
    fg = (np.asarray(mask) > 0)[..., None]
    return np.where(fg, (1 - alpha) * image + alpha * colours, image)


def render_predictions(model: torch.nn.Module, pairs: list, cfg: SegmentationDataConfig, path: Path) -> Path:
    """``predictions.png``: one row per test case — image | ground truth | prediction (with its IoU)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dataset = downstream.SegmentationDataset(
        pairs, downstream.JointTransform(cfg.image_size, train=False), cfg.num_classes
    )
    loader = DataLoader(dataset, batch_size=len(pairs), shuffle=False)
    batch, pred = next(iter(predict_batches(model, loader, next(model.parameters()).device)))
    images = batch["image"].permute(0, 2, 3, 1).numpy() * np.array(IMAGENET_STD) + np.array(IMAGENET_MEAN)
    images = np.clip(images, 0.0, 1.0)
    fig, axes = plt.subplots(len(pairs), 3, figsize=(9, 3 * len(pairs)), squeeze=False)
    for row, (img, gt, pr, key) in enumerate(
        zip(images, batch["mask"].numpy(), pred.numpy(), batch["key"], strict=False)
    ):
        iou = segmentation_scores(confusion_matrix(torch.from_numpy(pr), torch.from_numpy(gt), cfg.num_classes))[
            "fg_iou"
        ]
        panels = [
            (img, key),
            (overlay(img, gt), "ground truth"),
            (overlay(img, pr), f"prediction (fg IoU {iou:.2f}; line = truth)"),
        ]
        for ax, (pic, title) in zip(axes[row], panels, strict=False):
            ax.imshow(pic, interpolation="nearest")
            ax.set_title(title, fontsize=9)
            ax.axis("off")
        if gt.any():  # ground-truth outline on the prediction, for a side-by-side check
            axes[row][2].contour(gt > 0, levels=[0.5], colors="white", linewidths=1.0)
    fig.tight_layout()
    try:
        # keep_suffix: matplotlib picks the PNG format from the temp file's name.
        write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=80), keep_suffix=True)
    finally:
        plt.close(fig)
    return path


def _load_best(module: SegmentationModule, out: Path) -> str:
    """Put the best-val-mIoU weights into the model; returns which weights were used."""
    if module.best_state is not None:
        module.model.load_state_dict(module.best_state)
        return f"best val mIoU {module.best_miou:.4f} at step {module.best_step}"
    if module.best_miou >= 0 and (out / BEST_WEIGHTS).is_file():  # resumed after the best validation
        module.model.load_state_dict(load_file(os.fspath(out / BEST_WEIGHTS)))
        return "best val mIoU weights of an earlier attempt"
    return "final weights (no validation ran)"


def _sweep_metrics(miou: float, run_values: dict[str, Any]) -> dict[str, float]:
    """``kept_fraction`` and ``test/normdel`` when the run knows the kept fraction of its pre-training pool.

    A sweep passes ``kept_fraction`` (and its ``alpha``) in ``wandb.config``. It is logged as a
    metric too, in the row of the test scores, because a W&B line plot takes its x axis from
    logged metrics only (docs/wandb.md). A scratch run (R = 0) has no NormDEL; a standalone
    fine-tuning has neither.
    """
    kept = run_values.get("kept_fraction")
    if not isinstance(kept, (int, float)) or not 0.0 <= float(kept) <= 1.0:
        return {}
    metrics = {"kept_fraction": float(kept)}
    if kept > 0:
        metrics["test/normdel"] = normdel(float(miou), float(kept), float(run_values.get("alpha", 1.0)))
    return metrics


#: What a fine-tuning run directory holds (removed by ``overwrite=true``).
_OUTPUTS = (
    CHECKPOINT_DIR, "hpc_ckpt_*.ckpt", RESULTS_NAME, PER_IMAGE_NAME, BEST_WEIGHTS, "predictions.png", "metrics.csv",
    SPLIT_NAME,
)  # fmt: skip
#: The files ``results.json`` records the size and sha256 of.
_RECORDED = (PER_IMAGE_NAME, BEST_WEIGHTS)


def run_provenance(cfg: FinetuneConfig, encoder: EncoderConfig) -> dict[str, Any]:
    """The provenance record of a run: config and the content identities of the encoder and the dataset."""
    inputs = {
        "encoder.weights": provenance.path_identity(encoder.weights),
        "data.root": provenance.path_identity(cfg.data.root),
    }
    if cfg.data.groups and Path(cfg.data.groups).is_file():  # a CSV; a 'regex:' spec is a plain config value
        inputs["data.groups"] = provenance.path_identity(cfg.data.groups)
    return provenance.record("finetune", provenance.config_values(to_dict(cfg), inputs), inputs)


def _finished(out: Path) -> dict[str, Any] | None:
    """The results of a finished run whose recorded files are intact; None otherwise."""
    results = read_json(out / RESULTS_NAME)
    if results is None or not outputs.intact(out, results.get("outputs"), "finetune"):
        return None
    return results


@locked("finetune", collective=True)
def main(cfg: FinetuneConfig) -> dict[str, Any]:
    """Run (or resume, or skip) one fine-tuning; returns the results dict on every rank."""
    out = Path(cfg.out)
    # Input errors first: none of them may leave config.yaml, split.json or a W&B run behind.
    encoder = check_encoder(cfg.encoder)  # missing weights, an unknown or non-ViT name, a shape timm rejects
    check_downstream(cfg.data.root, cfg.data.layout, "data.root", cfg.data.groups)
    check_layout(cfg.trainer)
    provenance.settle(
        out,
        run_provenance(cfg, encoder),
        cfg.overwrite,
        clear=lambda: provenance.remove(out, _OUTPUTS),
        has_output=lambda: provenance.holds_any(out, _OUTPUTS),
    )
    finished = dist.broadcast_object(_finished(out) if dist.is_main() else None)
    if finished is not None:
        log.info("finetune: %s exists (same config and inputs), skipping", out / RESULTS_NAME)
        return finished
    # Built before anything is written too: it loads the weights and checks data.image_size against the patch size.
    model = build_model(cfg)
    dist.init()  # no-op for one process; under torchrun/srun Lightning joins this group
    if dist.is_main():
        save_resolved(cfg, out)
    data = SegmentationDataModule(cfg.data, out, label_seed=cfg.seed)
    data.setup()
    has_val = len(data.pairs["val"]) > 0
    if not data.pairs["test"]:
        raise ConfigError(f"data.root={cfg.data.root}: the test split is empty; set data.test_fraction > 0")

    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    module = SegmentationModule(
        model,
        lr=cfg.optim.lr,
        weight_decay=cfg.optim.weight_decay,
        layer_decay=cfg.optim.layer_decay,
        warmup_steps=cfg.optim.warmup_steps,
        max_steps=cfg.trainer.max_steps,
        min_lr_ratio=cfg.optim.min_lr_ratio,
        dice_weight=cfg.optim.dice_weight,
        best_path=out / BEST_WEIGHTS,
    )
    val_kwargs: dict[str, Any] = {"limit_val_batches": 0}
    if has_val and cfg.val_every_n_steps:
        # Counted in training batches; check_val_every_n_epoch=None lets it span epochs.
        every = min(cfg.val_every_n_steps, cfg.trainer.max_steps) * cfg.trainer.accumulate_grad_batches
        val_kwargs = {"val_check_interval": every, "check_val_every_n_epoch": None}
    elif has_val:
        val_kwargs = {}
    trainer, info = build_trainer(cfg.trainer, out, cfg.wandb, cfg.run_name or out.name, to_dict(cfg), **val_kwargs)
    status = "failed"
    try:
        ckpt = find_resume_checkpoint(out)  # the newest intact one, the same on every rank
        if ckpt is not None:
            log.info("finetune: resuming from %s", ckpt)
        start = time.perf_counter()
        # weights_only: a checkpoint is tensors and plain containers, so no pickled code is ever run.
        trainer.fit(module, datamodule=data, ckpt_path=os.fspath(ckpt) if ckpt else None, weights_only=True)
        train_s = time.perf_counter() - start

        model = module.model.float()  # DeepSpeed may have cast it to bf16; score in fp32
        chosen = _load_best(module, out)
        device = trainer.strategy.root_device
        model.to(device)
        share = evaluate_share(model, data.pairs["test"], cfg.data, dist.rank(), dist.world_size(), device)
        gathered = dist.all_gather_object(share)
        cm = np.sum([c for c, _ in gathered], axis=0)
        rows = [row for _, part in gathered for row in part]

        results: dict[str, Any] | None = None
        if dist.is_main():
            scores = segmentation_scores(cm)
            per_image = per_image_summary(
                [r["dice"] for r in rows], [r["iou"] for r in rows], sum(r["both_empty"] for r in rows)
            )
            results = {
                "format": FINETUNE_FORMAT,
                **scores,
                "scoring": "native",
                "per_image": per_image,
                "class_names": class_names(cfg),
                "n_test": len(data.pairs["test"]),
                "n_train": len(data.pairs["train"]),
                "label_draw": cfg.data.n_train > 0,
                "encoder_frozen": cfg.freeze_encoder,
                "n_val": len(data.pairs["val"]),
                "dataset": Path(cfg.data.root).name,
                "confusion_matrix": cm.astype(int).tolist(),
                "best_val_miou": module.best_miou if module.best_miou >= 0 else None,
                "best_step": module.best_step if module.best_step >= 0 else None,
                "weights": chosen,
                "steps": int(trainer.global_step),
                "train_time_s": round(train_s, 3),
                "resumed_from": os.fspath(ckpt) if ckpt else None,
                **encoder_record(cfg.encoder),
                "seed": cfg.seed,
                "strategy": info["strategy"],
                "world_size": info["world_size"],
            }
            text = per_image_csv(rows)
            write_atomic(out / PER_IMAGE_NAME, lambda tmp: tmp.write_text(text))
            final = {k: v.contiguous() for k, v in model.cpu().state_dict().items()}
            write_atomic(out / BEST_WEIGHTS, lambda tmp: safetensors_save(final, tmp))
            results["outputs"] = outputs.output_record(out, _RECORDED)
            if cfg.n_predictions:
                render_predictions(model, data.pairs["test"][: cfg.n_predictions], cfg.data, out / "predictions.png")
            # Logged last, so a W&B run's summary holds them: a dashboard plots summary values per run.
            metrics = {f"test/{k}": results[k] for k in ("miou", "dice", "fg_iou")}
            metrics |= {"test/per_image_dice": per_image["dice_mean"], "test/per_image_iou": per_image["iou_mean"]}
            metrics |= _sweep_metrics(results["miou"], cfg.wandb.config)
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=trainer.global_step)
            # results.json last: its presence marks the run complete.
            write_json_atomic(out / RESULTS_NAME, json_safe(results), indent=2)
            if not cfg.keep_checkpoints:
                shutil.rmtree(out / CHECKPOINT_DIR, ignore_errors=True)
            log.info(
                "finetune: test (native resolution) mIoU %.4f, Dice %.4f, fg IoU %.4f; per image Dice %.4f, IoU %.4f (%s)",
                results["miou"],
                results["dice"],
                results["fg_iou"],
                per_image["dice_mean"],
                per_image["iou_mean"],
                chosen,
            )
        trainer.strategy.barrier("finetune-results")  # a strategy barrier works on NCCL and gloo alike
        status = "success"
    finally:
        close_loggers(trainer, status)
    shared = dist.broadcast_object(results)
    assert shared is not None  # rank 0 always fills it
    return shared
