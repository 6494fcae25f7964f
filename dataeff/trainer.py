"""The Lightning shell shared by pre-training and fine-tuning.

``build_trainer`` turns a :class:`~dataeff.config.TrainerConfig` into a
``pytorch_lightning.Trainer``: it resolves ``strategy``/``precision``/``devices``/
``num_nodes`` from the hardware and the launcher environment (torchrun or SLURM,
read through :func:`dataeff.dist.env_from`), attaches a CSV logger (always) and a
W&B logger (offline unless ``WANDB_MODE`` is set), periodic + last + on-exception
checkpoints, and a throughput callback whose images/s also shows in the progress bar.

Pre-emption: Lightning's own signal connector turns SIGTERM into a
``SIGTERMException`` at the end of the running batch; ``ModelCheckpoint(
save_on_exception=True)`` then writes a checkpoint at the current step before the
process exits, and ``find_resume_checkpoint`` picks it up on restart. Under SLURM,
``launch/slurm`` sends ``USR1`` to the batch shell only (``--signal=B:USR1@300``),
which requeues the job; SLURM then stops the ranks with SIGTERM, the path above
saves the step, and the requeued job resumes (``resume=auto``). Lightning's own
``hpc_ckpt_<n>.ckpt`` files are considered too.

Checkpoints are written atomically with a digest record (:mod:`dataeff.checkpoints`;
DeepSpeed's folders too), an exception inside a batch writes none (a half-done batch
cannot be resumed exactly), and ``metrics.csv`` keeps each step once across resumes.

Model code never sees any of this: strategies live here and in configs only.
"""

from __future__ import annotations

import csv
import datetime
import hashlib
import logging
import os
import re
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from lightning_fabric.utilities.logger import _convert_params
from pytorch_lightning.callbacks import Callback, ModelCheckpoint, TQDMProgressBar
from pytorch_lightning.loggers import CSVLogger, Logger, WandbLogger
from pytorch_lightning.utilities import rank_zero_only

from dataeff import dist
from dataeff.checkpoints import KEEP_CHECKPOINTS, AtomicCheckpointIO, checkpoint_step, publish_folder
from dataeff.checkpoints import find_resume_checkpoint as find_resume_checkpoint  # the stages' resume choice
from dataeff.config import ConfigError, TrainerConfig, WandbConfig, redact_env
from dataeff.constants import CHECKPOINT_DIR
from dataeff.files import temp_name, write_atomic

log = logging.getLogger("dataeff")


# --------------------------------------------------------------------------- pure resolution


def resolve_layout(cfg: TrainerConfig, environ: Mapping[str, str], cuda_devices: int) -> dict[str, Any]:
    """Resolve accelerator, strategy, precision, devices and nodes without touching hardware.

    Args:
        cfg: the trainer section of a stage config.
        environ: the process environment (torchrun/SLURM variables are read from it).
        cuda_devices: CUDA devices visible to this process (``torch.cuda.device_count()``).

    Returns:
        ``{"accelerator", "strategy", "precision", "devices", "num_nodes", "world_size"}``
        with ``strategy``/``precision`` as Lightning names (``"deepspeed_stage_2"``,
        ``"ddp"``, ``"auto"``; ``"bf16-mixed"``, ``"32-true"``).

    Raises:
        ConfigError: for a GPU accelerator without GPUs, or a device count that does not
            match the launcher's world size.
    """
    env = dist.env_from(environ)
    accelerator = cfg.accelerator
    if accelerator == "auto":
        accelerator = "gpu" if cuda_devices > 0 else "cpu"
    if accelerator not in ("cpu", "gpu"):
        raise ConfigError(f"trainer.accelerator={cfg.accelerator!r}: choose 'auto', 'cpu' or 'gpu'")
    if accelerator == "gpu" and cuda_devices == 0:
        raise ConfigError("trainer.accelerator=gpu but no CUDA device is visible; use trainer.accelerator=cpu")

    num_nodes = cfg.num_nodes
    if cfg.devices != "auto":
        try:
            devices = int(cfg.devices)
        except ValueError:
            raise ConfigError(f"trainer.devices={cfg.devices!r}: 'auto' or a number of devices per node") from None
    elif env.world_size > 1:
        # One process per device was started by torchrun/srun: the launcher says how many per node.
        per_node = environ.get("LOCAL_WORLD_SIZE") or environ.get("SLURM_NTASKS_PER_NODE", "").split("(")[0]
        if per_node:
            devices = int(per_node)
        elif env.launcher == "slurm" and environ.get("SLURM_NNODES"):
            devices = env.world_size // int(environ["SLURM_NNODES"])
        else:
            devices = max(env.world_size // max(num_nodes, 1), 1)
    else:
        devices = cuda_devices if accelerator == "gpu" else 1
    if env.world_size > 1 and num_nodes == 1 and devices < env.world_size:
        num_nodes = env.world_size // devices
    world = devices * num_nodes
    if env.world_size > 1 and world != env.world_size:
        raise ConfigError(
            f"trainer.devices={devices} x trainer.num_nodes={num_nodes} = {world} processes, but the launcher "
            f"started {env.world_size}; set trainer.devices/num_nodes to match (or leave them 'auto'/1)"
        )

    strategy = cfg.strategy
    if strategy == "auto":
        if accelerator == "gpu":
            strategy = "deepspeed_stage_2"
        else:
            strategy = "ddp" if world > 1 else "auto"
    if strategy.startswith("deepspeed") and accelerator != "gpu":
        raise ConfigError(f"trainer.strategy={strategy}: DeepSpeed needs CUDA GPUs; use trainer.strategy=ddp on CPU")

    precision = cfg.precision
    if precision == "auto":
        precision = "bf16-mixed" if accelerator == "gpu" else "32-true"
    return {
        "accelerator": accelerator,
        "strategy": strategy,
        "precision": precision,
        "devices": devices,
        "num_nodes": num_nodes,
        "world_size": world,
    }


def check_layout(cfg: TrainerConfig) -> dict[str, Any]:
    """:func:`resolve_layout` for this process and machine: a stage calls it before writing anything."""
    return resolve_layout(cfg, os.environ, torch.cuda.device_count())


# --------------------------------------------------------------------------- callbacks


class ThroughputCallback(Callback):
    """Logs ``images_per_s`` (all ranks together) and, on GPU, ``gpu_mem_gb`` (peak, this rank).

    The images of a step are read from ``batch["image"]``; a moving average over the last
    steps is shown in the progress bar.
    """

    def __init__(self, window: int = 20) -> None:
        self.window = window
        self._t0: float | None = None
        self._times: list[tuple[float, int]] = []

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self._t0 is None:
            self._t0 = time.perf_counter()

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        now = time.perf_counter()
        n = int(batch["image"].shape[0]) * trainer.world_size
        assert self._t0 is not None
        self._times.append((now - self._t0, n))
        self._t0 = now
        self._times = self._times[-self.window :]
        seconds = sum(t for t, _ in self._times)
        rate = sum(k for _, k in self._times) / max(seconds, 1e-9)
        pl_module.log("images_per_s", rate, prog_bar=True, on_step=True, on_epoch=False, sync_dist=False)
        if pl_module.device.type == "cuda":
            mem = torch.cuda.max_memory_allocated(pl_module.device) / 2**30
            pl_module.log("gpu_mem_gb", mem, prog_bar=True, on_step=True, on_epoch=False, sync_dist=False)


class _StepProgressBar(TQDMProgressBar):
    """TQDM bar counting optimiser steps against ``max_steps`` (streams have no epoch length)."""

    def get_metrics(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)
        metrics["step"] = f"{trainer.global_step}/{trainer.max_steps}"
        return metrics


# --------------------------------------------------------------------------- checkpoints


class _Checkpoint(ModelCheckpoint):
    """``ModelCheckpoint`` keeping two step checkpoints, whose on-exception save comes only between batches.

    An exception raised inside a batch (a peer that died during the gradient all-reduce, a
    failed save) leaves that batch half done: its data counted as consumed and its mask
    seed drawn, its optimiser step not taken. A checkpoint then would make a resumed run
    skip that batch. SIGTERM (pre-emption) is raised between batches and still saves.
    """

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        batch = trainer.fit_loop.epoch_loop.batch_progress.current
        if batch.ready != batch.completed or trainer.validating:
            if self._should_save_on_exception(trainer):
                log.warning(
                    "%s inside step %d: no checkpoint of a half-done batch; a restart resumes from the last "
                    "complete checkpoint",
                    type(exception).__name__,
                    trainer.global_step,
                )
            return
        super().on_exception(trainer, pl_module, exception)

    def _save_none_monitor_checkpoint(self, trainer: pl.Trainer, monitor_candidates: dict[str, Any]) -> None:
        # Keep the two newest step checkpoints: resume falls back to the older if the newer is damaged.
        super()._save_none_monitor_checkpoint(trainer, monitor_candidates)
        assert self.dirpath is not None  # set from the run directory in build_trainer
        saved = sorted(Path(self.dirpath).glob("step=*.ckpt"), key=checkpoint_step)
        for old in saved[:-KEEP_CHECKPOINTS]:
            trainer.strategy.remove_checkpoint(old)


def _deepspeed_strategy(micro_batch_size: int | None) -> Any:
    """ZeRO-2 whose checkpoint folders are written under a temp name, digested and renamed like files."""
    from pytorch_lightning.strategies import DeepSpeedStrategy

    class _AtomicDeepSpeedStrategy(DeepSpeedStrategy):
        def save_checkpoint(self, checkpoint: dict, filepath: Any, storage_options: Any | None = None) -> None:
            # Every rank writes its shards into the same temp folder (on a filesystem all ranks share).
            final = Path(self.broadcast(os.fspath(filepath)))
            tmp = Path(self.broadcast(os.fspath(temp_name(final))))
            super().save_checkpoint(checkpoint, tmp, storage_options)
            self.barrier("checkpoint-written")
            if self.is_global_zero:
                publish_folder(tmp, final)
            self.barrier("checkpoint-published")

    # ZeRO-2: optimiser state and gradients sharded, parameters replicated; the
    # client optimiser (fused AdamW from the module) is wrapped by DeepSpeed.
    return _AtomicDeepSpeedStrategy(
        stage=2,
        zero_allow_untested_optimizer=True,
        logging_batch_size_per_gpu=micro_batch_size if micro_batch_size else "auto",
    )


# --------------------------------------------------------------------------- loggers


def stable_run_id(out_dir: Path, run_name: str) -> str:
    """A W&B run id derived from the run directory, so a resumed run continues the same W&B run."""
    digest = hashlib.sha1(f"{out_dir.resolve()}|{run_name}".encode()).hexdigest()[:12]
    return re.sub(r"[^A-Za-z0-9_-]", "_", f"{run_name[:40]}-{digest}")


class _ResumableCSVLogger(CSVLogger):
    """``CSVLogger`` writing ``<out>/metrics.csv`` that keeps the rows of earlier, interrupted runs, once each.

    Lightning's writer deletes an existing metrics file when it starts; a resumed run must
    append to it instead, so the old rows are put back and their header adopted. The
    interrupted run may have logged steps after the checkpoint it is resumed from; those
    are logged again, so at the first save the old rows from the first new step on are
    dropped. Hyperparameters (``hparams.yaml``) are written with :func:`redact_env`.
    """

    @property
    def experiment(self) -> Any:
        if self._experiment is not None or rank_zero_only.rank != 0:  # type: ignore[attr-defined]  # set by Lightning at import
            return super().experiment
        path = Path(self.log_dir) / "metrics.csv"
        old = path.read_text() if path.is_file() else ""
        experiment = super().experiment
        if old.strip():
            path.write_text(old)
            experiment.metrics_keys = sorted(old.splitlines()[0].split(","))
            save, trimmed = experiment.save, False

            def save_once_per_step() -> None:
                nonlocal trimmed
                if experiment.metrics and not trimmed:
                    _drop_rows_from(path, min(int(m["step"]) for m in experiment.metrics))
                    trimmed = True
                save()

            experiment.save = save_once_per_step
        return experiment

    def log_hyperparams(self, params: Any = None) -> None:
        super().log_hyperparams(redact_env(_convert_params(params)))


def _drop_rows_from(path: Path, step: int) -> None:
    """Rewrite ``metrics.csv`` (atomically) without its rows of step ``step`` and later."""
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        header = list(reader.fieldnames or [])
        rows = [r for r in reader if not r.get("step") or int(float(r["step"])) < step]

    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=header)
            writer.writeheader()
            writer.writerows(rows)

    write_atomic(path, write)


class _WandbLogger(WandbLogger):
    """``WandbLogger`` that leaves wandb's ``anonymous`` setting unset.

    Lightning passes ``anonymous=None`` to ``wandb.init`` even when the user set nothing,
    and wandb (0.31 here) answers every run with "The anonymous setting has no effect"; not
    passing it is what that warning asks for, and changes nothing else.
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if self._wandb_init.get("anonymous") is None:
            self._wandb_init.pop("anonymous", None)

    def log_hyperparams(self, params: Any) -> None:
        super().log_hyperparams(redact_env(_convert_params(params)))


def _build_loggers(
    out_dir: Path, wandb: WandbConfig, run_name: str, run_config: dict, flush_every: int
) -> list[Logger]:
    # metrics.csv directly in the run directory, flushed at every logging step so a killed
    # run keeps its rows (Lightning's "directory exists" warning about it is muted in dataeff.quiet).
    loggers: list[Logger] = [
        _ResumableCSVLogger(save_dir=os.fspath(out_dir), name="", version="", flush_logs_every_n_steps=flush_every)
    ]
    if wandb.enabled:
        # Offline files unless the user set WANDB_MODE; the API key, if any, comes from the
        # environment only (WANDB_API_KEY) and is never passed or logged here.
        loggers.append(
            _WandbLogger(
                name=run_name,
                project=wandb.project,
                group=wandb.group or None,
                tags=list(wandb.tags) or None,
                save_dir=os.fspath(out_dir),
                id=stable_run_id(out_dir, run_name),
                resume="allow",
                mode=wandb.mode,
                # Passed explicitly: wandb reads WANDB_JOB_TYPE (set per stage by the sweep) only
                # once per process, so every later run would inherit the first stage's job type.
                job_type=os.environ.get("WANDB_JOB_TYPE") or None,
                # Top-level keys, so W&B can group by them and plot them on an axis (tags cannot).
                # Values from the environment (an API key) go as their ${oc.env:...} expression.
                config=redact_env({**run_config, **wandb.config}),
            )
        )
    return loggers


def close_loggers(trainer: pl.Trainer, status: str = "success") -> None:
    """Finalise a trainer's loggers and end its W&B run, so the next stage opens a run of its own.

    Lightning's ``finalize`` leaves the W&B run open; while it is open, the next
    ``WandbLogger`` (and ``wandb.init``) of the same process adopts it, and every stage of
    a sweep would log into the first run. Call in a ``finally`` on every rank.
    """
    for logger in trainer.loggers:
        logger.finalize(status)
        # _experiment is None when the run was never opened (rank > 0, or a failure before any log).
        if isinstance(logger, WandbLogger) and getattr(logger, "_experiment", None) is not None:
            finish = getattr(logger.experiment, "finish", None)  # absent on a rank > 0 dummy
            if callable(finish):
                finish(exit_code=0 if status == "success" else 1)


# --------------------------------------------------------------------------- the factory


def build_trainer(
    cfg: TrainerConfig,
    out_dir: str | os.PathLike,
    wandb: WandbConfig,
    run_name: str,
    run_config: dict,
    extra_callbacks: Iterable[Callback] = (),
    *,
    micro_batch_size: int | None = None,
    **trainer_kwargs: Any,
) -> tuple[pl.Trainer, dict[str, Any]]:
    """A Lightning Trainer for one stage run.

    Args:
        cfg: trainer settings (strategy/precision/devices 'auto' are resolved here).
        out_dir: the run directory: ``checkpoints/``, ``metrics.csv`` and ``wandb/``
            go under it; it is also Lightning's ``default_root_dir``.
        wandb: W&B settings; ``enabled=false`` leaves only the CSV log.
        run_name: run name in W&B (and part of its stable id, so resumes continue it).
        run_config: flat or nested dict logged as the W&B run config.
        extra_callbacks: more callbacks (e.g. a stage's image panel).
        micro_batch_size: samples per device per forward pass. DeepSpeed needs it
            (``train_micro_batch_size_per_gpu``); Lightning can only infer it from a
            DataLoader with a batch sampler, which a streaming loader does not have.
        **trainer_kwargs: passed to ``pl.Trainer`` last, overriding the defaults here
            (e.g. ``use_distributed_sampler=False``, ``limit_val_batches=0``).

    Returns:
        ``(trainer, info)`` where ``info`` holds the resolved ``accelerator``, ``strategy``,
        ``precision``, ``devices``, ``num_nodes`` and ``world_size``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    layout = check_layout(cfg)
    strategy: Any = layout["strategy"]
    if strategy == "ddp" and layout["accelerator"] == "cpu":
        from pytorch_lightning.strategies import DDPStrategy

        strategy = DDPStrategy(process_group_backend="gloo", timeout=_dist_timeout())
    elif strategy == "deepspeed_stage_2":
        strategy = _deepspeed_strategy(micro_batch_size)

    throughput = ThroughputCallback()
    checkpoint = _Checkpoint(
        dirpath=os.fspath(out / CHECKPOINT_DIR),
        filename="step={step:08d}",
        auto_insert_metric_name=False,
        every_n_train_steps=cfg.checkpoint_every_n_steps,
        save_top_k=-1,  # pruned to the newest two by _Checkpoint
        save_last="link",  # a symlink to the newest save, not a second copy
        save_on_exception=True,  # SIGTERM -> SIGTERMException -> checkpoint at this step
        save_on_train_epoch_end=False,
        enable_version_counter=False,
    )
    callbacks: list[Callback] = [throughput, checkpoint, *extra_callbacks]
    if cfg.progress_bar:
        callbacks.append(_StepProgressBar(refresh_rate=1))
    kwargs: dict[str, Any] = dict(
        accelerator=layout["accelerator"],
        devices=layout["devices"],
        num_nodes=layout["num_nodes"],
        strategy=strategy,
        precision=layout["precision"],
        max_steps=cfg.max_steps,
        max_epochs=-1,
        accumulate_grad_batches=cfg.accumulate_grad_batches,
        gradient_clip_val=cfg.gradient_clip_val or None,
        log_every_n_steps=cfg.log_every_n_steps,
        default_root_dir=os.fspath(out),
        logger=_build_loggers(out, wandb, run_name, run_config, cfg.log_every_n_steps),
        callbacks=callbacks,
        plugins=[AtomicCheckpointIO()],
        enable_progress_bar=cfg.progress_bar,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    kwargs.update(trainer_kwargs)
    trainer = pl.Trainer(**kwargs)
    info = dict(layout)
    log.info(
        "trainer: %s, %s, %s x %d device(s) x %d node(s)",
        layout["strategy"],
        layout["precision"],
        layout["accelerator"],
        layout["devices"],
        layout["num_nodes"],
    )
    return trainer, info


def save_final_checkpoint(trainer: pl.Trainer, out_dir: str | os.PathLike) -> Path:
    """Checkpoint the current step (unless the periodic callback just did) and point ``last.ckpt`` at it.

    Call on every rank after ``trainer.fit`` (saving is collective under DeepSpeed).
    """
    ckpt_dir = Path(out_dir) / CHECKPOINT_DIR
    path = ckpt_dir / f"step={trainer.global_step:08d}.ckpt"
    # Decided once on rank 0: a rank that looked later would see rank 0's file and skip a collective.
    if not trainer.strategy.broadcast(path.exists()):
        # A full checkpoint (optimiser, loops, data position) is what resuming needs; saying so
        # also stops Lightning's "weights_only was not set" line on every run.
        trainer.save_checkpoint(os.fspath(path), weights_only=False)
    if trainer.is_global_zero:
        # Made under a temp name and renamed over the old link: 'last' always points somewhere.
        link = temp_name(ckpt_dir / "last.ckpt")
        os.symlink(path.name, link)
        os.replace(link, ckpt_dir / "last.ckpt")
    trainer.strategy.barrier("final-checkpoint")
    return path


def _dist_timeout() -> datetime.timedelta:
    return datetime.timedelta(seconds=float(os.environ.get("DATAEFF_DIST_TIMEOUT", dist.DEFAULT_TIMEOUT_S)))
