"""Optimiser and learning-rate schedule shared by pre-training and fine-tuning.

Pure helpers over parameter groups and step counts: no Lightning, no process group, no
file I/O, so model modules may build their optimisers from them.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from functools import partial
from typing import Any

import torch


def scaled_lr(base_lr: float, batch_size: int, accumulate: int, world_size: int) -> float:
    """The MAE linear scaling rule: ``base_lr x global batch / 256`` (MAE paper, Sec. A.1)."""
    return base_lr * batch_size * accumulate * world_size / 256.0


def make_adamw(
    params: Iterable[Any], lr: float, betas: tuple[float, float], weight_decay: float, device: torch.device
) -> torch.optim.Optimizer:
    """AdamW, fused where the hardware allows.

    On CUDA: DeepSpeed's ``FusedAdam`` (AdamW mode) when its op is pre-built in the
    installed DeepSpeed (building it just-in-time needs nvcc and can fail on a cluster
    node), else PyTorch's own fused AdamW kernel. On CPU: plain AdamW.
    """
    params = list(params)
    if device.type == "cuda":
        try:
            from deepspeed.git_version_info import installed_ops

            if installed_ops.get("fused_adam"):
                from deepspeed.ops.adam import FusedAdam

                return FusedAdam(params, lr=lr, betas=betas, weight_decay=weight_decay, adam_w_mode=True)
        except ImportError:
            pass
        return torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=weight_decay, fused=True)
    return torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=weight_decay)


def warmup_cosine(step: int, warmup: int, total: int, floor: float = 0.0) -> float:
    """lr multiplier: linear warm-up to 1, then half-cosine decay to ``floor`` at ``total``.

    Warm-up multipliers are ``(step + 1) / warmup`` so the first step already trains
    (MAE's per-iteration schedule); after ``total`` the multiplier stays at ``floor``.

    Args:
        step: optimiser step, from 0.
        warmup: warm-up steps (0 = none: the cosine starts at 1).
        total: schedule length in optimiser steps.
        floor: final multiplier, a fraction of the peak lr.
    """
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    progress = min(max(step - warmup, 0) / max(total - warmup, 1), 1.0)
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def warmup_cosine_scheduler(
    optimizer: torch.optim.Optimizer, warmup: int, total: int, floor: float = 0.0
) -> torch.optim.lr_scheduler.LambdaLR:
    """A per-step ``LambdaLR`` following :func:`warmup_cosine` (call ``step()`` after every optimiser step)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, partial(warmup_cosine, warmup=warmup, total=total, floor=floor))
