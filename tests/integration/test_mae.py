"""The MAE objective learns (a few steps on a fixed batch lower its loss); both LightningModules reload alone.

``load_from_checkpoint`` is checked on checkpoints of a plain Lightning ``Trainer`` after two
steps on random tensors, loaded weights-only: the same outputs as the trained module.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader

from dataeff.config import EncoderConfig
from dataeff.models import mae as M
from dataeff.models.mae import MAE
from tests.fixtures import tiny_encoder_config
from tests.unit.test_mae import TINY, tiny_model


def test_training_reduces_loss_on_fixed_batch():
    model = tiny_model()
    images = torch.randn(8, 3, 32, 32)
    noise = M.mask_noise(8, model.num_patches, seed=3)
    opt = torch.optim.AdamW(model.param_groups(), lr=3e-3)
    first = None
    for _ in range(30):
        loss = model(images, noise)[0].mean()
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.8 * first


def _fit_and_save(module: pl.LightningModule, batches: list[dict], path: Path) -> None:
    """Two optimiser steps of ``module`` on ``batches`` with a plain CPU Trainer, then a checkpoint at ``path``."""
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, DataLoader(batches, batch_size=None))
    trainer.save_checkpoint(path)


def test_load_from_checkpoint_rebuilds_the_trained_mae(tmp_path):
    model = tiny_model(seed=1)
    batches = [{"image": torch.randn(4, 3, 32, 32), "key": ["k"] * 4} for _ in range(2)]
    _fit_and_save(model, batches, tmp_path / "mae.ckpt")
    loaded = MAE.load_from_checkpoint(tmp_path / "mae.ckpt", weights_only=True).eval()
    images = torch.randn(3, 3, 32, 32)
    torch.testing.assert_close(loaded.reconstruction_loss(images, 5), model.eval().reconstruction_loss(images, 5))
    assert loaded.lr == model.lr and loaded.max_steps == 10


def test_load_from_checkpoint_of_an_mae_continued_from_weights(tmp_path):
    # Started from an export: the checkpoint must not need that export, and positions stay learnable.
    from dataeff.pretrain import export_encoder

    export_encoder(tiny_model(seed=4).encoder, TINY, tmp_path / "first")
    cfg = EncoderConfig(weights=str(tmp_path / "first"))  # name and shape come from the export
    model = MAE(cfg, M.MAEConfig(decoder_depth=1, decoder_dim=32, decoder_heads=2), lr=1e-3, max_steps=4)
    assert model.encoder.pos_embed.requires_grad
    batches = [{"image": torch.randn(4, 3, 32, 32), "key": ["k"] * 4} for _ in range(2)]
    _fit_and_save(model, batches, tmp_path / "mae.ckpt")
    shutil.rmtree(tmp_path / "first")
    loaded = MAE.load_from_checkpoint(tmp_path / "mae.ckpt", weights_only=True).eval()
    assert loaded.encoder.pos_embed.requires_grad
    images = torch.randn(3, 3, 32, 32)
    torch.testing.assert_close(loaded.reconstruction_loss(images, 5), model.eval().reconstruction_loss(images, 5))


def test_segmentation_module_load_from_checkpoint(tmp_path):
    from dataeff.finetune_module import SegmentationModule
    from dataeff.models.encoder import build_encoder
    from dataeff.models.segment import SegmentationModel

    torch.manual_seed(0)
    encoder = build_encoder(tiny_encoder_config(32))
    encoder.set_input_size(img_size=(48, 48))  # as fine-tuning at another size does
    module = SegmentationModule(
        SegmentationModel(encoder, num_classes=3, n_levels=2, channels=16),
        lr=1e-3,
        weight_decay=0.05,
        layer_decay=0.75,
        warmup_steps=1,
        max_steps=2,
        min_lr_ratio=0.0,
        dice_weight=1.0,
        best_path=tmp_path / "best.safetensors",
    )
    batches = [
        {"image": torch.randn(2, 3, 48, 48), "mask": torch.randint(0, 3, (2, 48, 48)), "key": ["k"] * 2}
        for _ in range(2)
    ]
    _fit_and_save(module, batches, tmp_path / "seg.ckpt")
    loaded = SegmentationModule.load_from_checkpoint(tmp_path / "seg.ckpt", weights_only=True).eval()
    images = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(images), module.eval().model(images))
    assert loaded.best_path is None and loaded.layer_decay == 0.75
