"""The Lightning shell of ``dataeff finetune``: training step, validation across ranks, best weights.

The networks, losses and parameter groups are in :mod:`dataeff.models.segment`; this
module adds what only a training run needs: summing validation confusion matrices over
ranks, tracking the best validation mIoU, writing those weights, and carrying the choice
through checkpoints. :mod:`dataeff.finetune` (the CLI stage) builds and runs it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities.types import OptimizerLRSchedulerConfig

from dataeff.checkpoints import safetensors_save
from dataeff.config import EncoderConfig
from dataeff.files import write_atomic
from dataeff.metrics import confusion_matrix, segmentation_scores
from dataeff.models.encoder import build_encoder, encoder_shape
from dataeff.models.segment import SegmentationModel, param_groups, segmentation_loss
from dataeff.optim import make_adamw, warmup_cosine_scheduler


def model_spec(model: SegmentationModel) -> dict[str, Any]:
    """The plain values that rebuild ``model``'s architecture (weights aside), read from the model itself.

    ``encoder`` holds :class:`~dataeff.config.EncoderConfig` fields: the timm name and the
    shape at the size the model runs at (position embeddings already resized), no weights.
    """
    # Pruning keeps every block up to the last level, which is the last block: depth is intact.
    encoder: Any = model.encoder  # timm sets pretrained_cfg on every model it creates, untyped
    name = str(encoder.pretrained_cfg["architecture"])
    return {
        "encoder": {"name": name, **encoder_shape(model.encoder)},
        "num_classes": int(model.num_classes),
        # level_indices(depth, n) has min(depth, n) distinct entries, so this rebuilds the same levels.
        "n_levels": len(model.indices),
        "channels": int(model.head.classifier.in_channels),
    }


def model_from_spec(spec: dict[str, Any]) -> SegmentationModel:
    """A randomly initialised :class:`SegmentationModel` of the architecture :func:`model_spec` describes."""
    encoder = build_encoder(EncoderConfig(**spec["encoder"], weights="", allow_random_init=True))
    return SegmentationModel(encoder, spec["num_classes"], spec["n_levels"], spec["channels"])


class SegmentationModule(pl.LightningModule):
    """Trains a :class:`~dataeff.models.segment.SegmentationModel` with CE + Dice, AdamW, warm-up + cosine.

    Validation accumulates one confusion matrix per epoch, sums it over ranks and logs
    ``val/miou``; the weights of the epoch with the best val mIoU are kept (on CPU, in
    ``best_state``) for the test evaluation. Under DDP/ZeRO-2 the model weights are
    replicated, so every rank holds the same best state. Lightning's distributed sampler
    may repeat a few val samples to even out ranks; that only affects model choice,
    never the reported test scores (evaluated without repeats by the stage).

    With ``best_path``, rank 0 also writes the best weights there (safetensors) at each
    improvement, and checkpoints carry the best score, so a resumed run keeps its choice.

    The saved hyperparameters describe the network as plain values (:func:`model_spec`:
    timm name, encoder shape, classes, head), so ``SegmentationModule.load_from_checkpoint(path)``
    rebuilds it, and loads with ``weights_only=True``; ``best_path`` is not saved (a loaded
    module writes nowhere unless given one).

    Args:
        model: encoder + head, or its :func:`model_spec` (what ``load_from_checkpoint`` passes).
        lr: peak learning rate of the head (encoder blocks get it times the layer decay).
        weight_decay: AdamW weight decay (not on norms, biases, tokens).
        layer_decay: layer-wise lr decay per encoder block (1.0 = off).
        warmup_steps: linear warm-up, optimiser steps.
        max_steps: schedule length, optimiser steps.
        min_lr_ratio: final lr as a fraction of the peak.
        dice_weight: loss = cross-entropy + ``dice_weight`` x soft Dice.
        best_path: where rank 0 writes the best-val-mIoU weights; None = keep them in memory only.

    Batches are ``{"image": (B, 3, S, S), "mask": (B, S, S) int64, "key": list[str]}``.
    """

    def __init__(
        self,
        model: SegmentationModel | dict[str, Any],
        lr: float,
        weight_decay: float,
        layer_decay: float,
        warmup_steps: int,
        max_steps: int,
        min_lr_ratio: float,
        dice_weight: float,
        best_path: str | os.PathLike | None = None,
    ) -> None:
        super().__init__()
        if isinstance(model, dict):
            model = model_from_spec(model)
        self.save_hyperparameters(
            {
                "model": model_spec(model),
                "lr": float(lr),
                "weight_decay": float(weight_decay),
                "layer_decay": float(layer_decay),
                "warmup_steps": int(warmup_steps),
                "max_steps": int(max_steps),
                "min_lr_ratio": float(min_lr_ratio),
                "dice_weight": float(dice_weight),
            },
            logger=False,  # the finetune stage logs its whole resolved config already
        )
        self.model = model
        self.lr, self.weight_decay, self.layer_decay = lr, weight_decay, layer_decay
        self.warmup_steps, self.max_steps, self.min_lr_ratio = warmup_steps, max_steps, min_lr_ratio
        self.dice_weight = dice_weight
        self.best_path = Path(best_path) if best_path else None
        self.best_miou = -1.0
        self.best_step = -1
        self.best_state: dict[str, torch.Tensor] | None = None
        self.history: list[dict[str, float]] = []
        self._val_cm: torch.Tensor | None = None

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        logits = self.model(batch["image"])
        loss = segmentation_loss(logits, batch["mask"], self.dice_weight)
        self.log("train/loss", loss, prog_bar=True, batch_size=batch["image"].shape[0])
        self.log("lr", self.optimizers().param_groups[-1]["lr"], batch_size=batch["image"].shape[0])  # type: ignore[union-attr]
        return loss

    def on_validation_epoch_start(self) -> None:
        n = self.model.num_classes
        self._val_cm = torch.zeros(n, n, dtype=torch.long, device=self.device)

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        assert self._val_cm is not None  # set by on_validation_epoch_start
        logits = self.model(batch["image"])
        self._val_cm += confusion_matrix(logits.argmax(1), batch["mask"], self.model.num_classes)

    def on_validation_epoch_end(self) -> None:
        assert self._val_cm is not None  # set by on_validation_epoch_start
        cm = self.all_gather(self._val_cm)
        assert isinstance(cm, torch.Tensor)  # a tensor in, a tensor out
        cm = cm.sum(0) if cm.ndim == 3 else cm  # (world, C, C) under DDP, (C, C) alone
        scores = segmentation_scores(cm)
        miou = scores["miou"] if scores["miou"] == scores["miou"] else 0.0  # NaN -> 0 for choice
        # Identical on every rank after the gather; sync_dist just averages equal values.
        self.log_dict({"val/miou": miou, "val/dice": scores["dice"], "val/fg_iou": scores["fg_iou"]}, sync_dist=True)
        if self.trainer.sanity_checking:
            return
        self.history.append({"step": int(self.global_step), "val_miou": miou})
        if miou > self.best_miou:
            self.best_miou, self.best_step = miou, int(self.global_step)
            best = {k: v.detach().float().cpu().clone() for k, v in self.model.state_dict().items()}
            self.best_state = best
            if self.best_path is not None and self.trainer.is_global_zero:
                write_atomic(self.best_path, lambda tmp: safetensors_save(best, tmp))

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["dataeff_best"] = {"miou": self.best_miou, "step": self.best_step, "history": self.history}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        best = checkpoint.get("dataeff_best", {})
        self.best_miou = float(best.get("miou", -1.0))
        self.best_step = int(best.get("step", -1))
        self.history = list(best.get("history", []))

    def configure_optimizers(self) -> OptimizerLRSchedulerConfig:
        groups = param_groups(self.model, self.lr, self.weight_decay, self.layer_decay)
        opt = make_adamw(groups, self.lr, (0.9, 0.999), self.weight_decay, self.device)
        sched = warmup_cosine_scheduler(opt, self.warmup_steps, self.max_steps, self.min_lr_ratio)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
