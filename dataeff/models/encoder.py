"""timm ViT encoders: build from config, load local weights, describe an export, pool features.

An exported encoder is a timm model folder, ``<pretrain out>/encoder/`` holding timm's
``config.json`` (architecture, constructor arguments, ``pretrained_cfg`` with the
training normalisation and size) and ``model.safetensors`` (the timm state dict, no
classifier head), so timm alone rebuilds it, with no extra arguments::

    import timm

    model = timm.create_model("local-dir:runs/tiny/pretrain/encoder", pretrained=True).eval()
    data_cfg = timm.data.resolve_data_config({}, model=model)  # ImageNet mean/std, (3, S, S)

(``local-dir:`` needs timm >= 1.0.16.) No weights are ever downloaded: a missing local
file is an error. dataeff's own loader (:func:`resolve`) takes the pre-training output,
the ``encoder/`` folder or its ``model.safetensors``, and still reads the
``encoder.safetensors`` + ``encoder.json`` exports of ``dataeff-encoder/1``. This module
only says *what* an export holds (:func:`export_contents`); the pre-training shell writes it.
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
from dataeff.constants import (
    ENCODER_FORMAT,
    ENCODER_META,
    ENCODER_WEIGHTS,
    IMAGENET_MEAN,
    IMAGENET_STD,
    LEGACY_ENCODER_META,
    LEGACY_ENCODER_WEIGHTS,
)

_SHAPE_KEYS = ("img_size", "patch_size", "depth", "embed_dim", "num_heads")


def model_kwargs(cfg: EncoderConfig) -> dict[str, Any]:
    """timm constructor arguments set by the config (None = the model's default)."""
    return {k: getattr(cfg, k) for k in _SHAPE_KEYS if getattr(cfg, k) is not None}


def _export_files(weights: str) -> tuple[Path, Path, bool] | None:
    """``(config, weights file, legacy)`` when ``weights`` names a dataeff export or timm folder, else None.

    Accepted: the pre-training output, its ``encoder/`` folder (or any timm model folder
    with ``config.json`` + ``model.safetensors``), or the weights file in either layout
    (timm folder, or ``dataeff-encoder/1``'s ``encoder.json`` beside ``encoder.safetensors``).
    """
    path = Path(weights)
    config_name, weights_name = Path(ENCODER_META).name, Path(ENCODER_WEIGHTS).name
    candidates: list[tuple[Path, Path, bool]] = []
    if path.is_dir():
        candidates = [
            (path / ENCODER_META, path / ENCODER_WEIGHTS, False),  # the pre-training output
            (path / config_name, path / weights_name, False),  # its encoder/ folder
            (path / LEGACY_ENCODER_META, path / LEGACY_ENCODER_WEIGHTS, True),
        ]
    elif path.name == weights_name:
        candidates = [(path.parent / config_name, path, False)]
    elif path.name == LEGACY_ENCODER_WEIGHTS:
        candidates = [(path.parent / LEGACY_ENCODER_META, path, True)]
    return next(((c, w, legacy) for c, w, legacy in candidates if c.is_file() and w.is_file()), None)


def resolve(cfg: EncoderConfig) -> EncoderConfig:
    """Fill name and shape from the export's ``config.json`` when ``weights`` is a dataeff export (or timm folder).

    ``weights`` then names the export's weights file.

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
    found = _export_files(cfg.weights)
    if found is None:
        return cfg
    config_path, weights_path, legacy = found
    meta = json.loads(config_path.read_text())
    name, args = (meta["model"], meta["kwargs"]) if legacy else (meta["architecture"], meta.get("model_args", {}))
    # A legacy export omitted the model's defaults (None); a timm folder's missing keys keep the config's.
    shape = {k: args.get(k) for k in _SHAPE_KEYS if legacy or k in args}
    return dataclasses.replace(cfg, name=name, weights=str(weights_path), **shape)


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
            pretrained_cfg_overlay=dict(file=os.fspath(cfg.weights), num_classes=0, custom_load=False),
            num_classes=0,
            **kwargs,
        )
    else:
        model = timm.create_model(cfg.name, pretrained=False, num_classes=0, **kwargs)
    return cast(VisionTransformer, model)


def encoder_shape(model: nn.Module) -> dict[str, int]:
    """A timm ViT's shape arguments as built (``img_size``, ``patch_size``, ``depth``, ``embed_dim``, ``num_heads``)."""
    enc: Any = model  # timm types many ViT attributes loosely
    return {
        "img_size": int(enc.patch_embed.img_size[0]),
        "patch_size": int(enc.patch_embed.patch_size[0]),
        "depth": len(enc.blocks),
        "embed_dim": int(enc.embed_dim),
        "num_heads": int(enc.blocks[0].attn.num_heads),
    }


def export_contents(model: nn.Module, cfg: EncoderConfig) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """What an encoder export holds: the timm state dict without its head, and timm's ``config.json``.

    The config is timm's hub/local-dir layout (``architecture``, ``num_classes``,
    ``model_args``, ``pretrained_cfg``), so ``timm.create_model("local-dir:<folder>",
    pretrained=True)`` needs no other argument. ``pretrained_cfg`` records what training
    used: ImageNet mean/std (not the timm model's default, which may be 0.5) and the
    trained input size.

    Returns:
        ``(state, config)``: contiguous CPU tensors, and the JSON-ready config.
    """
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items() if not k.startswith("head.")}
    shape = encoder_shape(model)
    size = shape["img_size"]
    config = {
        "architecture": cfg.name,
        "num_classes": 0,
        "num_features": shape["embed_dim"],
        "global_pool": str(getattr(model, "global_pool", "token")),
        "model_args": shape,
        "pretrained_cfg": {
            "input_size": [3, size, size],
            "fixed_input_size": True,
            "interpolation": "bicubic",  # the pre-training crops are resized bicubically
            "crop_pct": 1.0,  # dataeff resizes whole images, it never centre-crops
            "crop_mode": "center",
            "mean": list(IMAGENET_MEAN),
            "std": list(IMAGENET_STD),
            "num_classes": 0,
            "first_conv": "patch_embed.proj",
            "classifier": "head",
        },
        "dataeff_format": ENCODER_FORMAT,  # timm ignores unknown top-level keys
    }
    return state, config


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
