"""``dataeff pretrain``: MAE pre-training of a timm ViT on the selected samples of a shard set.

Shell only: the objective lives in :mod:`dataeff.models.mae`, the optimiser and schedule
in :mod:`dataeff.optim`, the Trainer (strategy, loggers, checkpoints, SIGTERM) in
:mod:`dataeff.trainer`, the data stream in
:class:`dataeff.data.datamodules.PretrainDataModule`. Every file of the run is written
here, atomically.

Outputs under ``out``: ``config.yaml``, ``checkpoints/``, ``metrics.csv``, ``panels/``
(original / masked / reconstructed images every ``panel_every_n_steps``), and at the
end ``encoder/`` (a timm folder: ``config.json`` + ``model.safetensors``), ``mae.ckpt`` (full MAE
for scoring) and ``summary.json``. A run whose ``summary.json`` says complete is skipped;
otherwise ``resume=auto`` continues from the newest checkpoint at the same step, data
position and learning-rate schedule.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

import numpy as np
import pytorch_lightning as pl
import torch
from PIL import Image

from dataeff import dist, outputs, provenance
from dataeff.checkpoints import checkpoint_problem, safetensors_save, torch_save
from dataeff.config import (
    ConfigError,
    DataConfig,
    EncoderConfig,
    TrainerConfig,
    WandbConfig,
    option,
    section,
    to_dict,
)
from dataeff.constants import (
    CHECKPOINT_DIR,
    ENCODER_DIR,
    ENCODER_META,
    ENCODER_WEIGHTS,
    IMAGENET_MEAN,
    IMAGENET_STD,
    LEGACY_ENCODER_META,
    LEGACY_ENCODER_WEIGHTS,
    MAE_CKPT,
    PRETRAIN_FORMAT,
    SUMMARY_NAME,
)
from dataeff.data import remote
from dataeff.data.datamodules import PretrainDataModule
from dataeff.encoder_check import check_encoder
from dataeff.files import save_resolved, write_atomic, write_json_atomic
from dataeff.input_checks import check_stream_data
from dataeff.lock import locked
from dataeff.models.encoder import build_encoder, export_contents, resolve
from dataeff.models.mae import MAE, MAEConfig, OptimConfig
from dataeff.optim import scaled_lr
from dataeff.trainer import (
    build_trainer,
    check_layout,
    close_loggers,
    find_resume_checkpoint,
    save_final_checkpoint,
)

log = logging.getLogger("dataeff")

_MEAN = np.asarray(IMAGENET_MEAN, dtype=np.float32)
_STD = np.asarray(IMAGENET_STD, dtype=np.float32)


Budget = Literal["steps", "epochs"]


@dataclass
class PretrainEncoderConfig(EncoderConfig):
    """The encoder to pre-train. Pre-training starts from scratch unless ``encoder=<weights>`` is
    given (continued pre-training), so random initialisation is allowed by default here."""

    allow_random_init: bool = option(True, help="start from a random encoder when no weights are given")


@dataclass
class PretrainConfig:
    """``dataeff pretrain``: masked-autoencoder pre-training on (selected) shards."""

    data: DataConfig = section(DataConfig, help="shards, selection, crop size, batch, loader")
    encoder: PretrainEncoderConfig = section(PretrainEncoderConfig, help="timm ViT to pre-train")
    mae: MAEConfig = section(MAEConfig, help="mask ratio, loss, decoder")
    optim: OptimConfig = section(OptimConfig, help="AdamW + warm-up/cosine schedule")
    trainer: TrainerConfig = section(TrainerConfig, help="steps, strategy, precision, checkpoints")
    wandb: WandbConfig = section(WandbConfig, help="W&B logging (offline unless WANDB_MODE is set)")
    out: str = option("runs/pretrain", help="run directory (checkpoints, logs, exported encoder)")
    seed: int = option(0, help="seeds the model init, the data order, augmentations and masks")
    budget: Budget = option(
        "steps",
        help="'steps' = trainer.max_steps optimiser steps for every subset; 'epochs' = every subset "
        "is seen `epochs` times (steps = epochs x full global batches per epoch)",
    )
    epochs: int = option(100, help="passes over the streamed subset when budget=epochs (ignored for 'steps')")
    resume: str = option("auto", help="'auto' = newest checkpoint in out/checkpoints, 'never', or a checkpoint path")
    run_name: str = option("", help="W&B run name (default: derived from out and the selection)")
    panel_every_n_steps: int = option(200, help="save a reconstruction panel every N steps (0 = only at the end)")
    panel_images: int = option(4, help="images in a reconstruction panel")
    overwrite: bool = option(
        False, help="start afresh in an out holding a run (or checkpoints) of another config or other inputs"
    )

    def __post_init__(self) -> None:
        if self.data.image_size != self.encoder.img_size:
            raise ConfigError(
                f"data.image_size={self.data.image_size} != encoder.img_size={self.encoder.img_size}: "
                "the MAE encoder is built for one image size; set both to the same value"
            )
        if self.resume not in ("auto", "never") and not Path(self.resume).exists():
            raise ConfigError(f"resume={self.resume!r}: 'auto', 'never' or an existing checkpoint path")
        if self.panel_every_n_steps < 0 or self.panel_images < 1:
            raise ConfigError("panel_every_n_steps must be >= 0 and panel_images >= 1")
        if self.budget not in get_args(Budget):
            raise ConfigError(f"budget={self.budget!r}: choose 'steps' or 'epochs'")
        if self.epochs < 1:
            raise ConfigError(f"epochs={self.epochs}: must be at least 1 (used when budget=epochs)")


# --------------------------------------------------------------------------- pure helpers


def budget_record(budget: str, steps: int, global_batch: int, subset_size: int) -> dict[str, Any]:
    """The budget fields of ``summary.json``: protocol, steps, images and passes over the subset.

    With full batches only, ``images_seen = steps x global_batch`` exactly (global batch =
    micro-batch x ranks x accumulation), and ``epochs_seen = images_seen / subset_size``.
    """
    images = steps * global_batch
    return {
        "budget": budget,
        "steps": steps,
        "global_batch": global_batch,
        "images_seen": images,
        "subset_size": subset_size,
        "epochs_seen": images / subset_size,
    }


def panel_array(original: torch.Tensor, masked: torch.Tensor, recon: torch.Tensor) -> np.ndarray:
    """One image row per sample: original | masked | reconstruction, de-normalised to uint8.

    Shape:
        each input: (B, 3, S, S) ImageNet-normalised -> (B*S, 3*S, 3) uint8
    """
    cols = [t.detach().float().cpu().permute(0, 2, 3, 1).numpy() * _STD + _MEAN for t in (original, masked, recon)]
    grid = np.concatenate([np.concatenate(list(c), axis=0) for c in cols], axis=1)
    return (np.clip(grid, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def selection_info(selection_dir: str) -> dict[str, Any]:
    """``method``, ``ratio``, ``kept``, ``kept_fraction`` from a selection's summary.json ({} when none)."""
    if not selection_dir:
        return {}
    path = remote.join(selection_dir, SUMMARY_NAME)
    if not remote.is_file(path):
        raise ConfigError(
            f"data.selection={selection_dir}: no summary.json there; point it at a 'dataeff select' output"
        )
    summary = json.loads(remote.read_text(path))
    return {k: summary.get(k) for k in ("method", "ratio", "kept", "kept_fraction", "pool_size")}


def is_complete(out: str | os.PathLike) -> bool:
    """True when a run directory holds a finished pre-training whose exports match their recorded sha256."""
    out = Path(out)
    if not all((out / name).is_file() for name in (SUMMARY_NAME, ENCODER_WEIGHTS, MAE_CKPT)):
        return False
    summary = json.loads((out / SUMMARY_NAME).read_text())
    return bool(summary.get("complete")) and outputs.intact(out, summary.get("outputs"), "pretrain")


# --------------------------------------------------------------------------- Lightning shell


class ReconstructionPanel(pl.Callback):
    """Every ``every_n_steps`` (rank 0): a PNG of original / masked / reconstructed images, also to W&B."""

    def __init__(self, out_dir: Path, every_n_steps: int, n_images: int) -> None:
        self.out_dir, self.every, self.n = out_dir / "panels", every_n_steps, n_images
        self.last_batch: torch.Tensor | None = None
        self._written = -1

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self.last_batch = batch["image"][: self.n].detach()
        step = trainer.global_step
        # With gradient accumulation several micro-batches share a step: write once per step.
        if self.every and step % self.every == 0 and step != self._written and trainer.is_global_zero:
            self.write(trainer, pl_module, step)

    def write(self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int) -> Path | None:
        if self.last_batch is None or not trainer.is_global_zero:
            return None
        masked, recon = pl_module.reconstruct(self.last_batch, mask_seed=step)  # type: ignore[operator]
        grid = panel_array(self.last_batch, masked, recon)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        path = self.out_dir / f"step={step:08d}.png"
        # keep_suffix: PIL picks the PNG format from the temp file's name.
        write_atomic(path, lambda tmp: Image.fromarray(grid).save(tmp), keep_suffix=True)
        self._written = step
        for logger in trainer.loggers:
            if hasattr(logger, "log_image"):
                logger.log_image(
                    key="reconstruction",
                    images=[os.fspath(path)],
                    caption=["original | masked | reconstruction"],
                    step=step,
                )
        return path


def _final_state(trainer: pl.Trainer, model: MAE, ckpt: Path) -> dict[str, torch.Tensor]:
    """Float32 weights of the trained MAE: DeepSpeed's fp32 master copy when it ran, else the module's."""
    state = {k: v.detach().float().cpu() for k, v in model.state_dict().items()}
    if type(trainer.strategy).__name__ == "DeepSpeedStrategy":
        # bf16 DeepSpeed keeps the module in bf16; the optimiser's fp32 master weights are the real ones.
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        fp32 = get_fp32_state_dict_from_zero_checkpoint(os.fspath(ckpt))
        for key, value in fp32.items():
            key = key.removeprefix("_forward_module.")
            if key in state:
                state[key] = value.float().cpu()
    return state


def export_encoder(model: torch.nn.Module, cfg: EncoderConfig, out_dir: str | os.PathLike) -> Path:
    """Write the timm model folder ``out_dir/encoder/`` (``model.safetensors`` + ``config.json``), atomically.

    ``timm.create_model("local-dir:<out_dir>/encoder", pretrained=True)`` loads it. The
    config is written last: it marks a complete export. Returns the weights file.
    """
    out = Path(out_dir)
    state, meta = export_contents(model, cfg)
    write_atomic(out / ENCODER_WEIGHTS, lambda tmp: safetensors_save(state, tmp))
    write_json_atomic(out / ENCODER_META, meta, indent=2)
    return out / ENCODER_WEIGHTS


def _export(cfg: PretrainConfig, model: MAE, state: dict[str, torch.Tensor], out: Path) -> None:
    """Write ``mae.ckpt`` and the timm-loadable encoder export (rank 0)."""
    blob = model.scoring_state(state)
    write_atomic(out / MAE_CKPT, lambda tmp: torch_save(blob, tmp))
    enc_cfg = dataclasses.replace(resolve(cfg.encoder), weights="", allow_random_init=True)
    encoder = build_encoder(enc_cfg)
    encoder.load_state_dict({k[len("encoder.") :]: v for k, v in state.items() if k.startswith("encoder.")})
    export_encoder(encoder, enc_cfg, out)


def _device_name(info: dict[str, Any]) -> str:
    if info["accelerator"] == "gpu":
        return f"{info['world_size']} x {torch.cuda.get_device_name(0)}"
    return f"{info['world_size']} x cpu"


#: What a pre-training run directory holds (removed by ``overwrite=true``).
_OUTPUTS = (
    CHECKPOINT_DIR, "hpc_ckpt_*.ckpt", SUMMARY_NAME, ENCODER_DIR, LEGACY_ENCODER_WEIGHTS, LEGACY_ENCODER_META,
    MAE_CKPT, "metrics.csv", "panels",
)  # fmt: skip


def run_provenance(cfg: PretrainConfig, encoder: EncoderConfig) -> dict[str, Any]:
    """The provenance record of a run: config and the content identities of pool, selection, encoder."""
    inputs = {
        "data.shards": provenance.pool_identity(cfg.data.shards),
        "data.selection": provenance.selection_identity(cfg.data.selection),
        "data.extra_shards": [provenance.pool_identity(str(s)) for s in cfg.data.extra_shards],
        "encoder.weights": provenance.path_identity(encoder.weights),
    }
    return provenance.record("pretrain", provenance.config_values(to_dict(cfg), inputs), inputs)


@locked("pretrain", collective=True)
def main(cfg: PretrainConfig) -> dict[str, Any] | None:
    """Run (or resume, or skip) one pre-training; returns the summary (None when interrupted)."""
    out = Path(cfg.out)
    # Input errors first: none of them may leave config.yaml, a checkpoint or a W&B run behind.
    check_stream_data(cfg.data)
    encoder = check_encoder(cfg.encoder)
    layout = check_layout(cfg.trainer)
    env = dist.init()
    if layout["world_size"] != env.world_size:
        raise ConfigError(
            f"the trainer runs {layout['world_size']} ranks but this process group has {env.world_size}: "
            "launch one process per device (torchrun / srun), so every rank streams its own share"
        )
    # Checkpoints and a finished run are reused only when made from the same config and inputs.
    record = run_provenance(cfg, encoder)
    if cfg.resume not in ("auto", "never"):
        provenance.check_checkpoint(cfg.resume, record)
    provenance.settle(
        out,
        record,
        cfg.overwrite,
        clear=lambda: provenance.remove(out, _OUTPUTS),
        has_output=lambda: provenance.holds_any(out, _OUTPUTS),
    )
    if is_complete(out):
        log.info("pretrain: %s is complete already (same config and inputs), skipping", out)
        return json.loads((out / SUMMARY_NAME).read_text())
    selection = selection_info(cfg.data.selection)
    accumulate = cfg.trainer.accumulate_grad_batches
    data = PretrainDataModule(cfg.data, seed=cfg.seed, rank=env.rank, world_size=env.world_size, accumulate=accumulate)
    data.setup()  # a subset smaller than one global batch is refused here, before any file is written
    if dist.is_main():
        save_resolved(cfg, out)
    run_name = cfg.run_name or out.name
    wandb = cfg.wandb
    if selection:
        tags = [f"method={selection['method']}", f"ratio={selection['ratio']}"]
        # As config values too, so runs can be grouped by method and plotted against kept_fraction;
        # the sweep's own values (cell, seed, ...) are kept.
        facts = {k: selection[k] for k in ("method", "ratio", "kept_fraction")}
        wandb = dataclasses.replace(
            wandb,
            tags=list(wandb.tags) + tags,
            group=wandb.group or f"ratio={selection['ratio']}",
            config={**facts, **wandb.config},
        )
    run_config = {**to_dict(cfg), "selection": selection}

    # Each key is read only under the protocol that uses it. An epoch budget counts full
    # global batches (the stream drops the remainder), so every subset gets the same passes.
    epochs = cfg.epochs if cfg.budget == "epochs" else None
    steps = cfg.trainer.max_steps if epochs is None else epochs * data.steps_per_epoch
    global_batch = cfg.data.batch_size * env.world_size * accumulate
    log.info(
        "pretrain: %s budget, %d steps of %d images over %d samples (%d steps per epoch)",
        cfg.budget,
        steps,
        global_batch,
        data.subset_size,
        data.steps_per_epoch,
    )
    if cfg.optim.warmup_steps >= steps:
        log.warning(
            "pretrain: optim.warmup_steps=%d >= %d steps: the run ends before the warm-up does",
            cfg.optim.warmup_steps,
            steps,
        )
    trainer_cfg = dataclasses.replace(cfg.trainer, max_steps=steps)
    panel = ReconstructionPanel(out, cfg.panel_every_n_steps, cfg.panel_images)
    trainer, info = build_trainer(
        trainer_cfg,
        out,
        wandb,
        run_name,
        run_config,
        extra_callbacks=[panel],
        micro_batch_size=cfg.data.batch_size,
        use_distributed_sampler=False,
        limit_val_batches=0,
    )
    lr = scaled_lr(cfg.optim.base_lr, cfg.data.batch_size, accumulate, info["world_size"])
    log.info("pretrain: peak lr %.3g (base %.3g x global batch %d / 256)", lr, cfg.optim.base_lr, global_batch)

    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    model = MAE(cfg.encoder, cfg.mae, cfg.optim, lr=lr, max_steps=steps, seed=cfg.seed)
    ckpt: Path | None = None
    if cfg.resume == "auto":
        ckpt = find_resume_checkpoint(out)  # the newest intact one, the same on every rank
    elif cfg.resume != "never":
        ckpt = Path(cfg.resume)
        problem = checkpoint_problem(ckpt) if dist.is_main() else None
        if dist.broadcast_object(problem):
            raise ConfigError(f"resume={cfg.resume}: {problem}; give another checkpoint or resume=auto")
    if ckpt is not None:
        log.info("pretrain: resuming from %s", ckpt)

    status = "failed"
    try:
        start = time.perf_counter()
        # weights_only: a checkpoint is tensors and plain containers, so no pickled code is ever run.
        trainer.fit(model, datamodule=data, ckpt_path=os.fspath(ckpt) if ckpt else None, weights_only=True)
        final_ckpt = save_final_checkpoint(trainer, out)
        panel.write(trainer, model, trainer.global_step)
        summary = None
        if trainer.is_global_zero:
            _export(cfg, model, _final_state(trainer, model, final_ckpt), out)
            done = int(trainer.global_step)
            record = budget_record(cfg.budget, done, global_batch, data.subset_size)
            # Full batches only: the counted images must be the planned ones, exactly.
            assert record["images_seen"] == model.images_seen, (record, model.images_seen)
            summary = {
                "format": PRETRAIN_FORMAT,
                "complete": True,
                **record,
                "epochs": epochs,
                "steps_per_epoch": data.steps_per_epoch,
                "final_loss": float(trainer.callback_metrics.get("loss", torch.tensor(float("nan")))),
                "wall_time_s": round(time.perf_counter() - start, 3),
                "resumed_from": os.fspath(ckpt) if ckpt else None,
                "device": _device_name(info),
                "strategy": info["strategy"],
                "precision": info["precision"],
                "world_size": info["world_size"],
                "lr": lr,
                "selection": selection,
                "outputs": outputs.output_record(out, (ENCODER_WEIGHTS, ENCODER_META, MAE_CKPT)),
            }
            write_json_atomic(out / SUMMARY_NAME, summary, indent=2, sort_keys=True)
            log.info(
                "pretrain: %d steps, %d images, encoder at %s",
                summary["steps"],
                summary["images_seen"],
                out / ENCODER_WEIGHTS,
            )
        trainer.strategy.barrier("pretrain-export")
        status = "success"
    finally:
        close_loggers(trainer, status)
    return dist.broadcast_object(summary)
