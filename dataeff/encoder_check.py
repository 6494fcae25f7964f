"""Is ``encoder.name`` a timm ViT that builds with the configured shape? Answered before any work.

An unknown name, a CNN (``resnet50``) or a shape timm rejects would otherwise surface as a
timm traceback after the stage has written its config and opened its W&B run. The check
builds the model on PyTorch's ``meta`` device: every module and parameter shape exists, no
memory is allocated and no weight is initialised, so a ViT-g costs a fraction of a second.
"""

from __future__ import annotations

import difflib
from typing import Any

import timm
import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from dataeff.config import ConfigError, EncoderConfig, first_line
from dataeff.models.encoder import model_kwargs, resolve

#: Errors timm's constructors raise for arguments a model does not take or cannot satisfy
#: (an unknown keyword, ``embed_dim`` not divisible by ``num_heads``, ...).
_BUILD_ERRORS = (TypeError, ValueError, AssertionError, RuntimeError)


def _build_on_meta(name: str, kwargs: dict[str, Any]) -> nn.Module:
    with torch.device("meta"):
        return timm.create_model(name, pretrained=False, num_classes=0, **kwargs)


def check_encoder(cfg: EncoderConfig, key: str = "encoder") -> EncoderConfig:
    """``cfg`` resolved (name and shape from a dataeff export), checked to build a timm ViT.

    Args:
        cfg: the stage's encoder section.
        key: its config key, named in the messages (``encoder``; ``pretrain.encoder`` in a sweep).

    Returns:
        :func:`dataeff.models.encoder.resolve` of ``cfg``.

    Raises:
        ConfigError: missing weights (see ``resolve``), a name timm does not know, a model
            that is not a ``VisionTransformer``, or shape keys the model rejects; one line
            naming the key and the fix.
    """
    enc = resolve(cfg)
    name = enc.name
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models("vit_*"), n=3)
        hint = f" (closest: {', '.join(close)})" if close else ""
        raise ConfigError(
            f"{key}.name={name!r}: timm has no such model{hint}; pick a ViT from timm.list_models('vit_*'), "
            "e.g. vit_small_patch16_224"
        )
    try:
        default = _build_on_meta(name, {})
    except _BUILD_ERRORS:
        # timm could not build its own default here; the shape check below (or the real
        # build) reports the problem, so an unusual model is never refused on a guess.
        default = None
    if default is not None and not isinstance(default, VisionTransformer):
        raise ConfigError(
            f"{key}.name={name!r} is a timm {type(default).__name__}, not a VisionTransformer; dataeff pre-trains "
            "and fine-tunes ViTs: pick one from timm.list_models('vit_*'), e.g. vit_small_patch16_224"
        )
    kwargs = model_kwargs(enc)
    try:
        _build_on_meta(name, kwargs)
    except _BUILD_ERRORS as exc:
        shape = " ".join(f"{key}.{k}={v}" for k, v in kwargs.items())
        raise ConfigError(
            f"{key}.name={name!r} does not build with {shape} ({first_line(exc)}); change those keys "
            "(embed_dim a multiple of num_heads, img_size a multiple of patch_size)"
        ) from None
    return enc
