"""timm ViT encoders: build from config, load local weights, describe an export, pool features.

An exported encoder is a directory holding ``encoder.safetensors`` (a timm state
dict without a classifier head) and ``encoder.json`` (timm name + constructor
arguments), so ``timm.create_model(name, pretrained=True,
pretrained_cfg_overlay=dict(file=...), **kwargs)`` rebuilds it exactly. No weights
are ever downloaded: a missing local file is an error. This module only says *what*
an export holds (:func:`export_contents`); the pre-training shell writes it.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, cast

import timm
import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from dataeff.config import ConfigError, EncoderConfig
from dataeff.constants import ENCODER_FORMAT, ENCODER_META, ENCODER_WEIGHTS

_SHAPE_KEYS = ("img_size", "patch_size", "depth", "embed_dim", "num_heads")


def model_kwargs(cfg: EncoderConfig) -> dict[str, Any]:
    """timm constructor arguments set by the config (None = the model's default)."""
    return {k: getattr(cfg, k) for k in _SHAPE_KEYS if getattr(cfg, k) is not None}


def _export_meta_path(weights: str) -> Path | None:
    path = Path(weights)
    if path.is_dir() and (path / ENCODER_META).is_file():
        return path / ENCODER_META
    if path.is_file() and (path.parent / ENCODER_META).is_file() and path.name == ENCODER_WEIGHTS:
        return path.parent / ENCODER_META
    return None


def resolve(cfg: EncoderConfig) -> EncoderConfig:
    """Fill name and shape from ``encoder.json`` when ``weights`` is a dataeff export.

    Raises:
        ConfigError: when no weights are given and random init is not allowed, or the
            weights file does not exist.
    """
    if not cfg.weights:
        if not cfg.allow_random_init:
            raise ConfigError(
                "no encoder weights given: set encoder=<path> to a local timm checkpoint or to the "
                "output directory of 'dataeff pretrain' (nothing is downloaded); "
                "encoder.allow_random_init=true permits a random encoder (tests only)"
            )
        return cfg
    if not Path(cfg.weights).exists():
        raise ConfigError(f"encoder.weights={cfg.weights}: no such file or directory")
    meta_path = _export_meta_path(cfg.weights)
    if meta_path is None:
        return cfg
    meta = json.loads(meta_path.read_text())
    shape = {k: meta["kwargs"].get(k) for k in _SHAPE_KEYS}
    return dataclasses.replace(cfg, name=meta["model"], weights=str(meta_path.parent / ENCODER_WEIGHTS), **shape)


def build_encoder(cfg: EncoderConfig) -> VisionTransformer:
    """A timm ViT without classifier head (``num_classes=0``), weights loaded if given.

    Returns the model in train mode; call ``.eval()`` for inference. Typed as timm's
    ``VisionTransformer``, the interface every caller uses (patch embedding, blocks,
    ``forward_features``); timm itself returns an untyped ``nn.Module``.
    """
    cfg = resolve(cfg)
    kwargs = model_kwargs(cfg)
    if cfg.weights:
        model = timm.create_model(
            cfg.name,
            pretrained=True,
            pretrained_cfg_overlay=dict(file=os.fspath(cfg.weights), num_classes=0),
            num_classes=0,
            **kwargs,
        )
    else:
        model = timm.create_model(cfg.name, pretrained=False, num_classes=0, **kwargs)
    return cast(VisionTransformer, model)


def export_contents(model: nn.Module, cfg: EncoderConfig) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """What an encoder export holds: the timm state dict without its head, and ``encoder.json``.

    Returns:
        ``(state, meta)``: contiguous CPU tensors, and ``{"model", "kwargs", "format"}``.
    """
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items() if not k.startswith("head.")}
    meta = {"model": cfg.name, "kwargs": model_kwargs(cfg), "format": ENCODER_FORMAT}
    return state, meta


def pooled_features(model: VisionTransformer, images: torch.Tensor, pool: str) -> torch.Tensor:
    """One vector per image from a timm ViT.

    Shape:
        images: (B, 3, H, W) -> (B, D)
    """
    tokens = model.forward_features(images)
    prefix = getattr(model, "num_prefix_tokens", 1)
    if pool == "cls":
        return tokens[:, 0]
    return tokens[:, prefix:].mean(dim=1)
