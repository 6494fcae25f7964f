"""Masked autoencoder (He et al., 2022, "Masked Autoencoders Are Scalable Vision Learners") on a timm ViT.

The encoder *is* a timm ``VisionTransformer`` (built by
:func:`dataeff.models.encoder.build_encoder`), used through its own submodules
(patch embedding, position embedding, blocks, norm), so the trained encoder exports
as a plain timm state dict. Only the visible 25 % of patches go through it; a light
decoder (MAE paper defaults: 8 blocks x 512, fixed 2-D sin-cos positions) predicts
the normalised pixels of the masked patches (MAE Sec. 3, "normalized pixels").

Pure pieces (patchify, masking, losses) are functions; :class:`MAE` is the
LightningModule shell. Masks are drawn from generators seeded by (seed, micro-step,
rank), never from the global RNG, so a resumed run draws the same masks as an
uninterrupted one and :meth:`MAE.reconstruction_loss` is reproducible. The optimiser and
schedule come from :mod:`dataeff.optim`; strategies, checkpoints and files belong to the
shell (:mod:`dataeff.pretrain`, :mod:`dataeff.trainer`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, TypeVar, cast

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities.types import OptimizerLRSchedulerConfig
from timm.models.vision_transformer import Block, VisionTransformer
from torch import nn
from torch.optim.lr_scheduler import LRScheduler

from dataeff.config import ConfigError, EncoderConfig, option
from dataeff.constants import MAE_CKPT, MAE_FORMAT
from dataeff.models.encoder import build_encoder, resolve
from dataeff.optim import make_adamw, warmup_cosine_scheduler


@dataclass
class MAEConfig:
    """The masked-autoencoder objective and decoder (MAE paper defaults)."""

    mask_ratio: float = option(0.75, help="fraction of patches hidden from the encoder (MAE: 0.75)")
    norm_pix_loss: bool = option(True, help="predict per-patch normalised pixels (MAE: true)")
    decoder_depth: int = option(8, help="decoder transformer blocks (MAE: 8)")
    decoder_dim: int = option(512, help="decoder token width (MAE: 512)")
    decoder_heads: int = option(16, help="decoder attention heads (MAE: 16)")
    fixed_pos_embed: bool = option(
        True, help="random-init encoders get fixed 2-D sin-cos positions, as in MAE (ignored with weights)"
    )

    def __post_init__(self) -> None:
        if not 0.0 < self.mask_ratio < 1.0:
            raise ConfigError(f"mae.mask_ratio={self.mask_ratio}: must be in (0, 1)")
        if self.decoder_dim % self.decoder_heads:
            raise ConfigError(
                f"mae.decoder_dim={self.decoder_dim} must be divisible by mae.decoder_heads={self.decoder_heads}"
            )
        if self.decoder_depth < 1:
            raise ConfigError("mae.decoder_depth must be at least 1")


@dataclass
class OptimConfig:
    """AdamW with the MAE linear scaling rule and warm-up + cosine schedule (MAE Table 8)."""

    base_lr: float = option(1.5e-4, help="lr per 256 images; actual lr = base_lr x global batch / 256")
    weight_decay: float = option(0.05, help="AdamW weight decay (not on biases, norms, tokens, positions)")
    beta1: float = option(0.9, help="AdamW beta1")
    beta2: float = option(0.95, help="AdamW beta2 (MAE: 0.95)")
    warmup_steps: int = option(40, help="linear warm-up steps (optimiser steps)")
    min_lr_ratio: float = option(0.0, help="cosine floor as a fraction of the peak lr")

    def __post_init__(self) -> None:
        if self.base_lr <= 0:
            raise ConfigError(f"optim.base_lr={self.base_lr}: must be positive")
        if self.warmup_steps < 0:
            raise ConfigError("optim.warmup_steps must be >= 0")


ConfigT = TypeVar("ConfigT")


def _as_config(cls: type[ConfigT], value: ConfigT | dict[str, Any]) -> ConfigT:
    """``value`` itself, or the ``cls`` dataclass rebuilt from a dict of its fields (checkpoint hyperparameters)."""
    return cls(**value) if isinstance(value, dict) else value


# --------------------------------------------------------------------------- pure functions


def sincos_pos_embed(dim: int, grid: tuple[int, int], prefix_tokens: int = 0) -> torch.Tensor:
    """Fixed 2-D sine-cosine position embedding (MAE ``get_2d_sincos_pos_embed``).

    Shape:
        returns (1, prefix_tokens + grid[0] * grid[1], dim); prefix rows are zero.
    """
    if dim % 4:
        raise ConfigError(f"sin-cos position embedding needs a width divisible by 4, got {dim}")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4.0))
    gh, gw = torch.meshgrid(
        torch.arange(grid[0], dtype=torch.float64), torch.arange(grid[1], dtype=torch.float64), indexing="ij"
    )

    def one_axis(pos: torch.Tensor) -> torch.Tensor:
        out = pos.reshape(-1)[:, None] * omega[None]
        return torch.cat([out.sin(), out.cos()], dim=1)

    emb = torch.cat([one_axis(gw), one_axis(gh)], dim=1)
    emb = torch.cat([torch.zeros(prefix_tokens, dim, dtype=torch.float64), emb], dim=0)
    return emb.float()[None]


def patchify(images: torch.Tensor, patch: int) -> torch.Tensor:
    """Cut images into flattened square patches, row-major, channels last within a patch.

    Shape:
        images: (B, C, H, W) -> (B, (H/p)*(W/p), p*p*C)
    """
    b, c, h, w = images.shape
    x = images.reshape(b, c, h // patch, patch, w // patch, patch)
    return torch.einsum("nchpwq->nhwpqc", x).reshape(b, (h // patch) * (w // patch), patch * patch * c)


def unpatchify(patches: torch.Tensor, patch: int, grid: tuple[int, int], channels: int = 3) -> torch.Tensor:
    """Inverse of :func:`patchify`.

    Shape:
        patches: (B, gh*gw, p*p*C) -> (B, C, gh*p, gw*p)
    """
    b = patches.shape[0]
    x = patches.reshape(b, grid[0], grid[1], patch, patch, channels)
    return torch.einsum("nhwpqc->nchpwq", x).reshape(b, channels, grid[0] * patch, grid[1] * patch)


def mask_noise(batch: int, patches: int, seed: int, shared: bool = False) -> torch.Tensor:
    """Uniform noise whose per-row argsort picks the visible patches, from a seeded CPU generator.

    Args:
        shared: one row repeated for the whole batch (the same mask for every image, so a
            sample's score does not depend on which batch it is in).

    Shape:
        returns (batch, patches)
    """
    gen = torch.Generator().manual_seed(int(seed) % 2**63)
    if shared:
        return torch.rand(1, patches, generator=gen).expand(batch, patches).contiguous()
    return torch.rand(batch, patches, generator=gen)


def split_by_noise(noise: torch.Tensor, keep: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Indices of kept patches, the restore permutation, and the binary mask (1 = hidden).

    Shape:
        noise: (B, N) -> ids_keep (B, keep), ids_restore (B, N), mask (B, N)
    """
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    mask = torch.ones_like(noise)
    mask[:, :keep] = 0
    return ids_shuffle[:, :keep], ids_restore, torch.gather(mask, 1, ids_restore)


def masked_patch_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, norm_pix: bool) -> torch.Tensor:
    """Per-sample mean squared error over the hidden patches (MAE loss), in float32.

    Shape:
        pred, target: (B, N, P); mask: (B, N) with 1 = hidden -> (B,)
    """
    pred, target = pred.float(), target.float()
    if norm_pix:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)
        target = (target - mean) / (var + 1e-6) ** 0.5
    per_patch = (pred - target).pow(2).mean(dim=-1)
    return (per_patch * mask).sum(dim=1) / mask.sum(dim=1).clamp_min(1.0)


def mix_seed(*parts: int) -> int:
    """A well-mixed 63-bit seed from several integers (step, rank, ...)."""
    return int(np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts]).generate_state(2, np.uint64)[0]) >> 1


# --------------------------------------------------------------------------- the LightningModule


class MAE(pl.LightningModule):
    """Masked autoencoder: a timm ViT encoder plus a light transformer decoder.

    Each config may also be given as a plain dict of its fields: that is how
    ``MAE.load_from_checkpoint(path)`` passes them back. The hyperparameters saved in
    Lightning checkpoints are plain dicts and numbers (no dataclass objects), so a
    checkpoint loads with ``weights_only=True``; they name no weights file (the
    checkpoint's state dict holds the weights), so the file the run started from need
    not exist any more.

    Args:
        encoder_cfg: the encoder (``build_encoder``); random init needs ``allow_random_init``.
        mae_cfg: mask ratio, loss and decoder shape.
        optim_cfg: optimiser and schedule; ``lr`` is the already scaled peak lr.
        lr: peak learning rate (``optim.scaled_lr(base_lr, ...)``); None = ``optim_cfg.base_lr``.
        max_steps: schedule length in optimiser steps.
        seed: mixes into every training mask.

    Batches are ``{"image": (B, 3, S, S), "key": list[str]}`` (ImageNet-normalised).
    """

    decoder_pos_embed: torch.Tensor  # fixed sin-cos buffer, registered in __init__

    def __init__(
        self,
        encoder_cfg: EncoderConfig | dict[str, Any],
        mae_cfg: MAEConfig | dict[str, Any] | None = None,
        optim_cfg: OptimConfig | dict[str, Any] | None = None,
        lr: float | None = None,
        max_steps: int = 1000,
        seed: int = 0,
    ) -> None:
        super().__init__()
        encoder_cfg = _as_config(EncoderConfig, encoder_cfg)
        # Resolved (name and shape of a dataeff export filled in), so the hyperparameters and
        # mae.ckpt describe the encoder that was built, not the path it came from.
        self.encoder_cfg = encoder_cfg = resolve(encoder_cfg)
        self.mae_cfg = mae_cfg = _as_config(MAEConfig, mae_cfg or MAEConfig())
        self.optim_cfg = _as_config(OptimConfig, optim_cfg or OptimConfig())
        self.lr = lr if lr is not None else self.optim_cfg.base_lr
        self.max_steps = max_steps
        self.seed = seed
        self.save_hyperparameters(
            {
                "encoder_cfg": dataclasses.asdict(dataclasses.replace(encoder_cfg, weights="", allow_random_init=True)),
                # An encoder that started from weights learnt its positions: rebuilt without
                # those weights it must keep them learnable, not get fixed sin-cos ones.
                "mae_cfg": {
                    **dataclasses.asdict(mae_cfg),
                    "fixed_pos_embed": mae_cfg.fixed_pos_embed and not encoder_cfg.weights,
                },
                "optim_cfg": dataclasses.asdict(self.optim_cfg),
                "lr": float(self.lr),
                "max_steps": int(max_steps),
                "seed": int(seed),
            },
            logger=False,  # the stage shells log the whole resolved config already
        )
        self.encoder: VisionTransformer = build_encoder(encoder_cfg)
        enc: Any = self.encoder  # timm types many ViT attributes loosely (Optional, Module)
        for attr in ("patch_embed", "blocks", "norm", "pos_embed", "num_prefix_tokens"):
            if not hasattr(enc, attr) or getattr(enc, attr) is None:
                raise ConfigError(f"encoder.name={encoder_cfg.name}: MAE needs a timm VisionTransformer with '{attr}'")
        if getattr(enc, "dynamic_img_size", False):
            raise ConfigError(f"encoder.name={encoder_cfg.name}: dynamic image size is not supported by MAE")
        self.patch = int(enc.patch_embed.patch_size[0])
        grid = enc.patch_embed.grid_size
        self.grid: tuple[int, int] = (int(grid[0]), int(grid[1]))
        self.num_patches = self.grid[0] * self.grid[1]
        self.prefix = int(enc.num_prefix_tokens)
        dim = int(enc.embed_dim)
        if mae_cfg.fixed_pos_embed and not encoder_cfg.weights:
            prefix = 0 if enc.no_embed_class else self.prefix
            enc.pos_embed.data.copy_(sincos_pos_embed(dim, self.grid, prefix))
            enc.pos_embed.requires_grad_(False)
        ddim = mae_cfg.decoder_dim
        self.decoder_embed = nn.Linear(dim, ddim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, ddim))
        self.register_buffer("decoder_pos_embed", sincos_pos_embed(ddim, self.grid, self.prefix), persistent=False)
        norm = partial(nn.LayerNorm, eps=1e-6)
        self.decoder_blocks = nn.Sequential(
            *[
                # timm calls norm_layer(dim): any layer factory works, not only a class.
                Block(ddim, mae_cfg.decoder_heads, mlp_ratio=4.0, qkv_bias=True, norm_layer=norm)  # type: ignore[arg-type]
                for _ in range(mae_cfg.decoder_depth)
            ]
        )
        self.decoder_norm = norm(ddim)
        self.decoder_pred = nn.Linear(ddim, self.patch * self.patch * 3)
        self._init_decoder()
        self.micro_step = 0  # forward passes so far; seeds the masks, saved in checkpoints
        self.images_seen = 0  # images over all ranks so far, saved in checkpoints

    def _init_decoder(self) -> None:
        # MAE: xavier-uniform linears, zero biases, N(0, 0.02) mask token.
        torch.nn.init.normal_(self.mask_token, std=0.02)
        for module in [self.decoder_embed, self.decoder_blocks, self.decoder_norm, self.decoder_pred]:
            for m in module.modules():
                if isinstance(m, nn.Linear):
                    torch.nn.init.xavier_uniform_(m.weight)
                    if m.bias is not None:
                        nn.init.zeros_(m.bias)
                elif isinstance(m, nn.LayerNorm):
                    nn.init.ones_(m.weight)
                    nn.init.zeros_(m.bias)

    # ------------------------------------------------------------------ forward

    def keep_count(self) -> int:
        return max(int(round(self.num_patches * (1.0 - self.mae_cfg.mask_ratio))), 1)

    def forward_encoder(
        self, images: torch.Tensor, noise: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Encode the visible patches (lowest noise first).

        Shape:
            images: (B, 3, S, S), noise: (B, N) -> latent (B, prefix + keep, D), mask (B, N), ids_restore (B, N)
        """
        enc = self.encoder
        x = enc.patch_embed(images)
        pos = enc.pos_embed
        assert pos is not None  # checked in __init__
        patch_pos = pos if enc.no_embed_class else pos[:, self.prefix :]
        x = x + patch_pos
        ids_keep, ids_restore, mask = split_by_noise(noise.to(x.device), self.keep_count())
        x = torch.gather(x, 1, ids_keep[..., None].expand(-1, -1, x.shape[-1]))
        tokens = [
            t.expand(x.shape[0], -1, -1) for t in (enc.cls_token, getattr(enc, "reg_token", None)) if t is not None
        ]
        if tokens:
            prefix = torch.cat(tokens, dim=1)
            if not enc.no_embed_class:
                prefix = prefix + pos[:, : self.prefix]
            x = torch.cat([prefix, x], dim=1)
        x = enc.norm_pre(enc.pos_drop(x))
        x = enc.norm(enc.blocks(x))
        return x, mask.to(x.dtype), ids_restore

    def forward_decoder(self, latent: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        """Predict every patch's pixels from the visible tokens plus mask tokens.

        Shape:
            latent: (B, prefix + keep, D), ids_restore: (B, N) -> (B, N, p*p*3)
        """
        x = self.decoder_embed(latent)
        prefix, visible = x[:, : self.prefix], x[:, self.prefix :]
        n_masked = ids_restore.shape[1] - visible.shape[1]
        x_ = torch.cat([visible, self.mask_token.to(x.dtype).expand(x.shape[0], n_masked, -1)], dim=1)
        x_ = torch.gather(x_, 1, ids_restore[..., None].expand(-1, -1, x.shape[-1]))
        x = torch.cat([prefix, x_], dim=1) + self.decoder_pos_embed.to(x.dtype)
        x = self.decoder_norm(self.decoder_blocks(x))
        return self.decoder_pred(x)[:, self.prefix :]

    def forward(self, images: torch.Tensor, noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-sample loss, predictions and mask for one batch under the given mask noise.

        Shape:
            images: (B, 3, S, S), noise: (B, N) -> loss (B,), pred (B, N, p*p*3), mask (B, N)
        """
        latent, mask, ids_restore = self.forward_encoder(images, noise)
        pred = self.forward_decoder(latent, ids_restore)
        loss = masked_patch_loss(pred, patchify(images, self.patch), mask, self.mae_cfg.norm_pix_loss)
        return loss, pred, mask

    @torch.no_grad()
    def reconstruction_loss(self, images: torch.Tensor, mask_seed: int) -> torch.Tensor:
        """Per-sample normalised-pixel MAE loss under one fixed, seed-determined mask (OptiDEL hardness).

        Every image gets the same mask (drawn from ``mask_seed``), so a sample's score is
        reproducible and independent of the batch it is scored in. Use in eval mode.

        Shape:
            images: (B, 3, S, S) -> (B,) float32 on the images' device
        """
        images = images.to(self.decoder_pred.weight.device, self.decoder_pred.weight.dtype)
        noise = mask_noise(images.shape[0], self.num_patches, mask_seed, shared=True)
        loss, _, _ = self(images, noise)
        return loss.float()

    @torch.no_grad()
    def reconstruct(self, images: torch.Tensor, mask_seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Masked input and reconstruction (visible patches pasted back), in the input's pixel space.

        Shape:
            images: (B, 3, S, S) -> masked (B, 3, S, S), reconstructed (B, 3, S, S)
        """
        images = images.to(self.decoder_pred.weight.device, self.decoder_pred.weight.dtype)
        noise = mask_noise(images.shape[0], self.num_patches, mask_seed)
        _, pred, mask = self(images, noise)
        target = patchify(images, self.patch).float()
        pred = pred.float()
        if self.mae_cfg.norm_pix_loss:
            # Undo the per-patch normalisation with the true patch statistics (as MAE's demo does).
            pred = pred * (target.var(-1, keepdim=True) + 1e-6) ** 0.5 + target.mean(-1, keepdim=True)
        m = mask.float()[..., None]
        masked = unpatchify(target * (1 - m), self.patch, self.grid)
        recon = unpatchify(target * (1 - m) + pred * m, self.patch, self.grid)
        return masked, recon

    # ------------------------------------------------------------------ training

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        images = batch["image"]
        noise = mask_noise(images.shape[0], self.num_patches, mix_seed(self.seed, self.micro_step, self.global_rank))
        self.micro_step += 1
        self.images_seen += images.shape[0] * self.trainer.world_size
        loss = self(images, noise)[0].mean()
        self.log("loss", loss, prog_bar=True, on_step=True, on_epoch=False)
        scheduler = cast(LRScheduler, self.lr_schedulers())  # the one configure_optimizers returns
        self.log("lr", float(scheduler.get_last_lr()[0]), on_step=True, on_epoch=False)
        self.log("images_seen", float(self.images_seen), on_step=True, on_epoch=False)
        return loss

    def param_groups(self) -> list[dict[str, Any]]:
        """AdamW groups: no weight decay on biases, norms, tokens and position embeddings (MAE/timm rule)."""
        no_decay_names = ("pos_embed", "cls_token", "reg_token", "mask_token")
        decay: list[nn.Parameter] = []
        no_decay: list[nn.Parameter] = []
        for name, p in self.named_parameters():
            if not p.requires_grad:
                continue
            (no_decay if p.ndim <= 1 or name.split(".")[-1] in no_decay_names else decay).append(p)
        return [
            {"params": decay, "weight_decay": self.optim_cfg.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]

    def configure_optimizers(self) -> OptimizerLRSchedulerConfig:
        o = self.optim_cfg
        device = self.trainer.strategy.root_device if self._trainer is not None else self.device
        optimizer = make_adamw(self.param_groups(), self.lr, (o.beta1, o.beta2), o.weight_decay, device)
        scheduler = warmup_cosine_scheduler(optimizer, o.warmup_steps, self.max_steps, o.min_lr_ratio)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step", "frequency": 1}}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["dataeff_mae"] = {"micro_step": self.micro_step, "images_seen": self.images_seen}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("dataeff_mae", {})
        self.micro_step = int(state.get("micro_step", 0))
        self.images_seen = int(state.get("images_seen", 0))

    # ------------------------------------------------------------------ export / load

    def scoring_state(self, state_dict: dict[str, torch.Tensor] | None = None) -> dict[str, Any]:
        """What ``mae.ckpt`` holds: format, configs as plain dicts, float32 state dict."""
        enc = dataclasses.replace(self.encoder_cfg, weights="", allow_random_init=True)
        state = state_dict if state_dict is not None else self.state_dict()
        return {
            "format": MAE_FORMAT,
            "encoder": dataclasses.asdict(enc),
            "mae": dataclasses.asdict(self.mae_cfg),
            "state_dict": {k: v.detach().float().cpu().contiguous() for k, v in state.items()},
        }

    @classmethod
    def load_for_scoring(cls, path: str | Path, device: str | torch.device = "cpu") -> MAE:
        """The full MAE (decoder included) from ``mae.ckpt`` or a pretrain output directory, in eval mode.

        Loaded with ``weights_only=True`` (no pickle code runs).
        """
        path = Path(path)
        if path.is_dir():
            path = path / MAE_CKPT
        if not path.is_file():
            raise ConfigError(
                f"no MAE checkpoint at {path}: point to a 'dataeff pretrain' output directory or its {MAE_CKPT}"
            )
        blob = torch.load(path, map_location="cpu", weights_only=True)
        if blob.get("format") != MAE_FORMAT:
            raise ConfigError(f"{path}: not a {MAE_FORMAT} checkpoint (format={blob.get('format')!r})")
        mae_cfg = MAEConfig(**{**blob["mae"], "fixed_pos_embed": False})
        model = cls(EncoderConfig(**blob["encoder"]), mae_cfg)
        model.load_state_dict(blob["state_dict"])
        return model.to(device).eval()
