"""Segmentation model: a pre-trained timm ViT encoder + a multi-level progressive-upsampling head.

The head follows SETR-MLA (Zheng et al., CVPR 2021, "multi-level feature aggregation"):
features of ``n_levels`` evenly spaced transformer blocks are taken with timm's
``forward_intermediates`` (no hooks), projected to ``channels`` by 1x1 convs, aggregated
top-down (deepest first, each level adds the deeper one), each stream is upsampled
progressively (x2 steps, conv-GN-ReLU after each) to 1/4 of the input, the streams are
concatenated, fused and classified, and the logits are bilinearly upsampled to the input.
We chose it over UperNet for the small downstream sets of the benchmark (60 to 3,762
images): at 128 channels it adds 2.8M parameters to ViT-B (86M), an order of magnitude
fewer than a 512-channel UperNet — less to overfit and fast enough for CPU tests — needs
no artificial feature pyramid from a plain ViT, and still uses several encoder depths as
the papers' protocol asks. GroupNorm rather than BatchNorm: batches are small and
GroupNorm needs no SyncBN under DDP/DeepSpeed.

The training shell (validation gather, best-weights tracking and writing) is
:class:`dataeff.finetune_module.SegmentationModule`; this module holds the networks,
the losses and the optimiser parameter groups only.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Iterator
from typing import Any, cast

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer
from torch import nn


def level_indices(depth: int, n_levels: int) -> list[int]:
    """``n_levels`` evenly spaced block indices ending at the last block (all blocks if fewer).

    Example: depth 12, 4 levels -> [2, 5, 8, 11] (as SETR-MLA / MAE segmentation use).
    """
    if depth < 1 or n_levels < 1:
        raise ValueError(f"depth ({depth}) and n_levels ({n_levels}) must be >= 1")
    n = min(depth, n_levels)
    return sorted({round(depth * (i + 1) / n) - 1 for i in range(n)})


def _gn(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(32, channels), channels)


def _conv_block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), _gn(cout), nn.ReLU(inplace=True))


class MLAHead(nn.Module):
    """SETR-MLA-like head over several ViT levels.

    Args:
        in_dim: encoder token width D.
        n_levels: number of encoder levels L fed to the head.
        patch_size: encoder patch stride p; streams are upsampled by ~p/4 in x2 steps.
        num_classes: output classes C (background included).
        channels: width of every stream.

    Shape:
        features: L tensors (B, D, H/p, W/p), shallow to deep -> (B, C, H/4, W/4)
    """

    def __init__(self, in_dim: int, n_levels: int, patch_size: int, num_classes: int, channels: int = 128) -> None:
        super().__init__()
        self.lateral = nn.ModuleList(
            nn.Sequential(nn.Conv2d(in_dim, channels, 1, bias=False), _gn(channels)) for _ in range(n_levels)
        )
        n_up = max(0, math.ceil(math.log2(patch_size / 4))) if patch_size > 4 else 0
        self.streams = nn.ModuleList(
            nn.ModuleList([_conv_block(channels, channels)] + [_conv_block(channels, channels) for _ in range(n_up)])
            for _ in range(n_levels)
        )
        self.fuse = _conv_block(channels * n_levels, channels)
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def forward(self, features: list[torch.Tensor], out_hw: tuple[int, int]) -> torch.Tensor:
        lat = [proj(f) for proj, f in zip(self.lateral, features, strict=False)]
        # Top-down aggregation: deeper (more semantic) levels flow into shallower ones.
        for i in range(len(lat) - 2, -1, -1):
            lat[i] = lat[i] + lat[i + 1]
        quarter = (max(1, out_hw[0] // 4), max(1, out_hw[1] // 4))
        outs = []
        for x, stream in zip(lat, self.streams, strict=False):
            blocks = cast(nn.ModuleList, stream)
            x = blocks[0](x)
            for block in blocks[1:]:
                x = block(F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=False))
            if x.shape[-2:] != quarter:  # patch sizes that are not 4·2^k
                x = F.interpolate(x, size=quarter, mode="bilinear", align_corners=False)
            outs.append(x)
        return self.classifier(self.fuse(torch.cat(outs, dim=1)))


class SegmentationModel(nn.Module):
    """timm ViT encoder + :class:`MLAHead`; logits at input resolution.

    Args:
        encoder: a timm VisionTransformer (``forward_intermediates`` is required).
        num_classes: C, background included (2 for binary polyp segmentation).
        n_levels: encoder depths fed to the head (evenly spaced, last block included).
        channels: head width.

    Shape:
        images: (B, 3, H, W) -> logits (B, C, H, W)
    """

    def __init__(self, encoder: VisionTransformer, num_classes: int, n_levels: int = 4, channels: int = 128) -> None:
        super().__init__()
        if not hasattr(encoder, "forward_intermediates"):
            raise TypeError(f"{type(encoder).__name__} has no forward_intermediates; use a timm ViT")
        if num_classes < 2:
            raise ValueError(f"num_classes={num_classes}: need >= 2 (background + foreground)")
        self.indices = level_indices(len(encoder.blocks), n_levels)
        # Drop the final norm/head: unused here, and unused parameters break DDP.
        encoder.prune_intermediate_layers(self.indices, prune_norm=True, prune_head=True)
        self.encoder = encoder
        patch = encoder.patch_embed.patch_size
        self.head = MLAHead(encoder.embed_dim, len(self.indices), int(patch[0]), num_classes, channels)
        self.num_classes = num_classes

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        feats = self.encoder.forward_intermediates(
            images, indices=self.indices, norm=False, output_fmt="NCHW", intermediates_only=True
        )
        logits = self.head(feats, images.shape[-2:])
        return F.interpolate(logits, size=images.shape[-2:], mode="bilinear", align_corners=False)


def dice_loss(logits: torch.Tensor, target: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """Soft Dice loss over the foreground classes 1..C-1, pooled over the batch.

    Pooling over the whole batch (not per image) keeps the loss defined for images with
    empty masks, mirroring how the metrics accumulate over the set.

    Shape:
        logits: (B, C, H, W), target: (B, H, W) int -> scalar
    """
    probs = logits.float().softmax(dim=1)[:, 1:]
    onehot = F.one_hot(target.long(), logits.shape[1]).permute(0, 3, 1, 2)[:, 1:].to(probs.dtype)
    inter = (probs * onehot).sum(dim=(0, 2, 3))
    denom = probs.sum(dim=(0, 2, 3)) + onehot.sum(dim=(0, 2, 3))
    return (1.0 - (2.0 * inter + eps) / (denom + eps)).mean()


def segmentation_loss(logits: torch.Tensor, target: torch.Tensor, dice_weight: float = 1.0) -> torch.Tensor:
    """Cross-entropy + ``dice_weight`` x soft Dice.

    Shape:
        logits: (B, C, H, W), target: (B, H, W) int -> scalar
    """
    ce = F.cross_entropy(logits.float(), target.long())
    return ce + dice_weight * dice_loss(logits, target) if dice_weight > 0 else ce


def _layer_id(name: str, depth: int) -> int:
    """Layer index for layer-wise lr decay: embeddings 0, block i -> i+1, the rest depth+1."""
    if name.startswith("encoder."):
        rest = name[len("encoder.") :]
        if rest.startswith(("cls_token", "pos_embed", "reg_token", "patch_embed", "mask_token")):
            return 0
        match = re.match(r"blocks\.(\d+)\.", rest)
        if match:
            return int(match.group(1)) + 1
    return depth + 1


def param_groups(
    model: SegmentationModel, lr: float, weight_decay: float, layer_decay: float = 1.0
) -> list[dict[str, Any]]:
    """AdamW parameter groups: no weight decay on norms/biases/tokens, optional layer-wise lr decay.

    With ``layer_decay`` = d < 1, encoder block i gets ``lr · d^(depth − i)`` and the
    embeddings ``lr · d^(depth + 1)`` (BEiT/MAE fine-tuning recipe); the head gets ``lr``.
    """
    depth = len(model.encoder.blocks)
    groups: dict[tuple[int, bool], dict[str, Any]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        no_decay = p.ndim <= 1 or name.endswith(("cls_token", "pos_embed", "reg_token"))
        layer = _layer_id(name, depth)
        key = (layer, no_decay)
        if key not in groups:
            scale = layer_decay ** (depth + 1 - layer)
            groups[key] = {
                "params": [],
                "lr": lr * scale,
                "weight_decay": 0.0 if no_decay else weight_decay,
            }
        groups[key]["params"].append(p)
    return [groups[k] for k in sorted(groups)]


@torch.no_grad()
def predict_batches(
    model: nn.Module, batches: Iterable[dict[str, Any]], device: torch.device | str = "cpu"
) -> Iterator[tuple[dict[str, Any], torch.Tensor]]:
    """Yield ``(batch, predicted class map)`` for every batch, model in eval mode.

    Shape:
        batch["image"]: (B, 3, H, W) -> prediction (B, H, W) int64 on CPU
    """
    model.eval()
    for batch in batches:
        logits = model(batch["image"].to(device))
        yield batch, logits.argmax(dim=1).cpu()


def native_prediction(logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Class map at a mask's native size: bilinear upsampling of the logits, then argmax.

    Upsampling logits (not the arg-maxed classes) keeps boundaries smooth and is how
    segmentation benchmarks score at the original resolution (mmseg's ``resize`` in
    ``slide``/``whole`` inference).

    Shape:
        logits: (C, h, w) -> (H, W) int64, (H, W) = ``size``
    """
    up = F.interpolate(logits[None].float(), size=size, mode="bilinear", align_corners=False)
    return up[0].argmax(dim=0)


@torch.no_grad()
def predict_native_batches(
    model: nn.Module, batches: Iterable[dict[str, Any]], device: torch.device | str = "cpu"
) -> Iterator[tuple[dict[str, Any], list[torch.Tensor]]]:
    """Yield ``(batch, predicted class maps at each native mask's size)``, model in eval mode.

    Batches need ``"native_mask"``: a list of (H_i, W_i) masks (see ``downstream.collate_native``).

    Shape:
        batch["image"]: (B, 3, S, S) -> B predictions (H_i, W_i) int64 on CPU
    """
    model.eval()
    for batch in batches:
        logits = model(batch["image"].to(device))
        preds = [
            native_prediction(lg, tuple(m.shape[-2:])).cpu() for lg, m in zip(logits, batch["native_mask"], strict=True)
        ]
        yield batch, preds
