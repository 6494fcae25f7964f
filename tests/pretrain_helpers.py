"""Shared by the pre-training tests (integration and GPU): the tiny config and callbacks.

Plain functions and classes only, no pytest fixtures, so a test module imports what it
uses without pulling fixtures into its namespace.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import timm
import torch

from dataeff import pretrain
from dataeff.config import load_config
from dataeff.constants import ENCODER_DIR
from tests.fixtures import REPO, make_shards

TINY = str(REPO / "configs" / "pretrain" / "tiny.yaml")
STEPS = 8


def tiny_shards(tmp: Path) -> Path:
    """24 real images in 4 shards of up to 7 samples, long side 40 px."""
    return make_shards(tmp, n=24, size=40, samples_per_shard=7)


def config(shards: Path, out: Path, *extra: str) -> pretrain.PretrainConfig:
    """``configs/pretrain/tiny.yaml`` for STEPS steps of batch 6, checkpoints every 3 steps."""
    overrides = [
        f"data.shards={shards}",
        f"out={out}",
        f"trainer.max_steps={STEPS}",
        "trainer.checkpoint_every_n_steps=3",
        "trainer.progress_bar=false",
        "data.batch_size=6",
        "panel_every_n_steps=4",
        *extra,
    ]
    return load_config(pretrain.PretrainConfig, TINY, overrides)


def load_exported(out: Path) -> torch.nn.Module:
    """The encoder a pre-training exported to ``out``, loaded by timm alone from its folder (eval mode)."""
    return timm.create_model(f"local-dir:{out / ENCODER_DIR}", pretrained=True).eval()


class SigtermAt(pl.Callback):
    """Sends this process SIGTERM after optimiser step ``step``, as SLURM does before pre-emption."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGTERM)


def add_callback(monkeypatch: Any, callback: pl.Callback) -> None:
    """Make ``pretrain.main`` build its Trainer with ``callback`` added (undone with ``monkeypatch``)."""
    original = pretrain.build_trainer

    def patched(*args: Any, extra_callbacks: Any = (), **kwargs: Any) -> Any:
        return original(*args, extra_callbacks=[*extra_callbacks, callback], **kwargs)

    monkeypatch.setattr(pretrain, "build_trainer", patched)
