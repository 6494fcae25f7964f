"""timm ViT encoders: build from config, load local weights, export, pool features.

An exported encoder is a directory holding ``encoder.safetensors`` (a timm state
dict without a classifier head) and ``encoder.json`` (timm name + constructor
arguments), so ``timm.create_model(name, pretrained=True,
pretrained_cfg_overlay=dict(file=...), **kwargs)`` rebuilds it exactly. No weights
are ever downloaded: a missing local file is an error.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import timm
import torch
from safetensors.torch import save_file
from torch import nn

from dataeff.config import ConfigError, EncoderConfig
from dataeff.files import write_atomic, write_json_atomic

EXPORT_WEIGHTS = "encoder.safetensors"
EXPORT_META = "encoder.json"
_SHAPE_KEYS = ("img_size", "patch_size", "depth", "embed_dim", "num_heads")


def model_kwargs(cfg: EncoderConfig) -> dict[str, Any]:
    """timm constructor arguments set by the config (None = the model's default)."""
    return {k: getattr(cfg, k) for k in _SHAPE_KEYS if getattr(cfg, k) is not None}


def _export_meta_path(weights: str) -> Path | None:
    path = Path(weights)
    if path.is_dir() and (path / EXPORT_META).is_file():
        return path / EXPORT_META
    if path.is_file() and (path.parent / EXPORT_META).is_file() and path.name == EXPORT_WEIGHTS:
        return path.parent / EXPORT_META
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
    return dataclasses.replace(cfg, name=meta["model"], weights=str(meta_path.parent / EXPORT_WEIGHTS), **shape)


def build_encoder(cfg: EncoderConfig) -> nn.Module:
    """A timm ViT without classifier head (``num_classes=0``), weights loaded if given.

    Returns the model in train mode; call ``.eval()`` for inference.
    """
    cfg = resolve(cfg)
    kwargs = model_kwargs(cfg)
    if cfg.weights:
        return timm.create_model(
            cfg.name,
            pretrained=True,
            pretrained_cfg_overlay=dict(file=os.fspath(cfg.weights), num_classes=0),
            num_classes=0,
            **kwargs,
        )
    return timm.create_model(cfg.name, pretrained=False, num_classes=0, **kwargs)


def export_encoder(model: nn.Module, cfg: EncoderConfig, out_dir: str | os.PathLike) -> Path:
    """Write ``encoder.safetensors`` + ``encoder.json`` into ``out_dir`` (atomically)."""
    out = Path(out_dir)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items() if not k.startswith("head.")}
    write_atomic(out / EXPORT_WEIGHTS, lambda tmp: save_file(state, os.fspath(tmp)))
    meta = {"model": cfg.name, "kwargs": model_kwargs(cfg), "format": "dataeff-encoder/1"}
    write_json_atomic(out / EXPORT_META, meta, indent=2)
    return out / EXPORT_WEIGHTS


def pooled_features(model: nn.Module, images: torch.Tensor, pool: str) -> torch.Tensor:
    """One vector per image from a timm ViT.

    Shape:
        images: (B, 3, H, W) -> (B, D)
    """
    tokens = model.forward_features(images)
    prefix = getattr(model, "num_prefix_tokens", 1)
    if pool == "cls":
        return tokens[:, 0]
    return tokens[:, prefix:].mean(dim=1)
