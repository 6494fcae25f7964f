"""The MAE objective on a tiny timm ViT, on random tensors: shapes, loss, masks, scoring, export.

The schedule and lr scaling rule are tested in ``test_optim.py``; training in ``tests/integration/test_mae.py``.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from dataeff.config import ConfigError, EncoderConfig
from dataeff.models import mae as M
from dataeff.models.mae import MAE, MAEConfig, OptimConfig

TINY = EncoderConfig(
    name="vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, embed_dim=64, num_heads=2, allow_random_init=True
)
TINY_MAE = MAEConfig(decoder_depth=1, decoder_dim=32, decoder_heads=2)


def tiny_model(seed: int = 0, **mae_kwargs) -> MAE:
    torch.manual_seed(seed)
    return MAE(TINY, MAEConfig(**{**TINY_MAE.__dict__, **mae_kwargs}), OptimConfig(), lr=1e-3, max_steps=10)


def reference_loss(imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor, p: int) -> torch.Tensor:
    """The MAE repository's ``forward_loss`` (per-sample variant), written out independently."""
    n, c, h, w = imgs.shape
    x = imgs.reshape(n, 3, h // p, p, w // p, p).permute(0, 2, 4, 3, 5, 1).reshape(n, (h // p) * (w // p), p * p * 3)
    mean, var = x.mean(-1, keepdim=True), x.var(-1, keepdim=True)
    target = (x - mean) / (var + 1e-6) ** 0.5
    loss = ((pred - target) ** 2).mean(-1)
    return (loss * mask).sum(1) / mask.sum(1)


def reference_sincos(dim: int, size: int) -> np.ndarray:
    """MAE's numpy ``get_2d_sincos_pos_embed`` (without the cls row)."""

    def one(d, pos):
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    grid = np.meshgrid(np.arange(size, dtype=np.float32), np.arange(size, dtype=np.float32))  # w first, as MAE
    grid = np.stack(grid, axis=0).reshape(2, 1, size, size)
    return np.concatenate([one(dim // 2, grid[0]), one(dim // 2, grid[1])], axis=1)


def test_patchify_roundtrip_and_layout():
    imgs = torch.randn(2, 3, 32, 32)
    patches = M.patchify(imgs, 8)
    assert patches.shape == (2, 16, 8 * 8 * 3)
    assert torch.equal(M.unpatchify(patches, 8, (4, 4)), imgs)
    # patch 1 is the second patch of the first row, pixels channel-last
    assert torch.equal(patches[0, 1].reshape(8, 8, 3), imgs[0, :, :8, 8:16].permute(1, 2, 0))


def test_sincos_matches_mae_reference():
    ours = M.sincos_pos_embed(64, (4, 4), prefix_tokens=1)
    assert ours.shape == (1, 17, 64)
    assert torch.all(ours[0, 0] == 0)
    np.testing.assert_allclose(ours[0, 1:].numpy(), reference_sincos(64, 4), atol=1e-6)


def test_masked_loss_matches_reference():
    torch.manual_seed(0)
    imgs, pred = torch.randn(3, 3, 32, 32), torch.randn(3, 16, 192)
    mask = (torch.rand(3, 16) > 0.5).float()
    mask[:, 0] = 1
    got = M.masked_patch_loss(pred, M.patchify(imgs, 8), mask, norm_pix=True)
    torch.testing.assert_close(got, reference_loss(imgs, pred, mask, 8))


def test_split_by_noise_keeps_lowest_noise():
    noise = torch.tensor([[0.9, 0.1, 0.5, 0.3]])
    keep, restore, mask = M.split_by_noise(noise, 2)
    assert keep.tolist() == [[1, 3]]
    assert mask.tolist() == [[1, 0, 1, 0]]
    assert torch.equal(torch.argsort(torch.argsort(noise)), restore)


def test_forward_shapes_and_mask_ratio():
    model = tiny_model()
    noise = M.mask_noise(4, model.num_patches, seed=1)
    loss, pred, mask = model(torch.randn(4, 3, 32, 32), noise)
    assert loss.shape == (4,) and pred.shape == (4, 16, 192) and mask.shape == (4, 16)
    assert mask.sum(1).tolist() == [12.0] * 4  # 0.75 of 16 hidden
    assert torch.isfinite(loss).all()


def test_encoder_path_equals_timm_forward_without_masking():
    model = tiny_model().eval()
    model.mae_cfg.mask_ratio = 1e-9  # keep every patch, in identity order
    images = torch.randn(2, 3, 32, 32)
    noise = torch.arange(16, dtype=torch.float32).expand(2, 16)
    latent, mask, _ = model.forward_encoder(images, noise)
    assert mask.sum() == 0
    torch.testing.assert_close(latent, model.encoder.forward_features(images), atol=1e-5, rtol=1e-5)


def test_fixed_positions_for_random_init():
    model = tiny_model()
    assert not model.encoder.pos_embed.requires_grad
    torch.testing.assert_close(model.encoder.pos_embed, M.sincos_pos_embed(64, (4, 4), 1))
    trainable = {id(p) for g in model.param_groups() for p in g["params"]}
    assert id(model.encoder.pos_embed) not in trainable
    no_decay = {id(p) for p in model.param_groups()[1]["params"]}
    assert id(model.encoder.cls_token) in no_decay and id(model.mask_token) in no_decay
    assert id(model.encoder.blocks[0].attn.qkv.weight) not in no_decay


def test_reconstruction_loss_reproducible_and_batch_independent():
    model = tiny_model().eval()
    images = torch.randn(6, 3, 32, 32)
    full = model.reconstruction_loss(images, mask_seed=7)
    assert full.shape == (6,) and full.dtype == torch.float32
    again = model.reconstruction_loss(images, mask_seed=7)
    torch.testing.assert_close(full, again, rtol=0, atol=0)
    # the same image scores the same whatever else is in its batch, in any order
    part = model.reconstruction_loss(images[[4, 1]], mask_seed=7)
    torch.testing.assert_close(part, full[[4, 1]], atol=1e-5, rtol=1e-5)
    other_seed = model.reconstruction_loss(images, mask_seed=8)
    assert not torch.allclose(other_seed, full)


def test_scoring_checkpoint_roundtrip(tmp_path):
    model = tiny_model(seed=5).eval()
    torch.save(model.scoring_state(), tmp_path / "mae.ckpt")
    loaded = MAE.load_for_scoring(tmp_path)  # directory form
    assert not loaded.training
    images = torch.randn(3, 3, 32, 32)
    torch.testing.assert_close(loaded.reconstruction_loss(images, 1), model.reconstruction_loss(images, 1))
    with pytest.raises(ConfigError, match="no MAE checkpoint"):
        MAE.load_for_scoring(tmp_path / "missing")


def test_reconstruct_pastes_visible_patches():
    model = tiny_model().eval()
    images = torch.randn(2, 3, 32, 32)
    masked, recon = model.reconstruct(images, mask_seed=0)
    visible = (masked != 0).any(1, keepdim=True).expand_as(images)
    assert visible.float().mean().item() == pytest.approx(0.25, abs=0.01)
    torch.testing.assert_close(recon[visible], images[visible])


def test_config_checks():
    with pytest.raises(ConfigError, match="mask_ratio"):
        MAEConfig(mask_ratio=1.0)
    with pytest.raises(ConfigError, match="decoder_heads"):
        MAEConfig(decoder_dim=30, decoder_heads=4)


def test_export_is_a_timm_folder_and_resolve_reads_every_form(tmp_path):
    import json

    import timm
    from safetensors.torch import save_file

    from dataeff.constants import ENCODER_DIR, ENCODER_META, ENCODER_WEIGHTS, IMAGENET_MEAN
    from dataeff.models.encoder import export_contents, resolve
    from dataeff.pretrain import export_encoder

    model = tiny_model(seed=2).eval()
    out = tmp_path / "run"
    export_encoder(model.encoder, TINY, out)
    config = json.loads((out / ENCODER_META).read_text())
    assert config["architecture"] == TINY.name and config["num_classes"] == 0
    assert config["model_args"] == {"img_size": 32, "patch_size": 8, "depth": 2, "embed_dim": 64, "num_heads": 2}
    assert config["pretrained_cfg"]["input_size"] == [3, 32, 32]
    assert config["pretrained_cfg"]["mean"] == list(IMAGENET_MEAN)
    # timm alone, no kwargs: the folder says everything.
    loaded = timm.create_model(f"local-dir:{out / ENCODER_DIR}", pretrained=True).eval()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded.forward_features(images), model.encoder.forward_features(images))

    # dataeff's loader: the run directory, its encoder/ folder or the weights file; name and shape from config.json.
    bare = EncoderConfig(allow_random_init=False)  # vit_base at 224 unless the export says otherwise
    for given in (out, out / ENCODER_DIR, out / ENCODER_WEIGHTS):
        got = resolve(dataclasses.replace(bare, weights=str(given)))
        assert (got.name, got.img_size, got.depth, got.embed_dim) == (TINY.name, 32, 2, 64), given
        assert got.weights == str(out / ENCODER_WEIGHTS)

    # dataeff-encoder/1 exports (encoder.safetensors + encoder.json in the run directory) are still read.
    old = tmp_path / "old-run"
    old.mkdir()
    state, _ = export_contents(model.encoder, TINY)
    save_file(state, str(old / "encoder.safetensors"))
    kwargs = {"img_size": 32, "patch_size": 8, "depth": 2, "embed_dim": 64, "num_heads": 2}
    meta = {"model": TINY.name, "kwargs": kwargs, "format": "dataeff-encoder/1"}
    (old / "encoder.json").write_text(json.dumps(meta))
    for given in (old, old / "encoder.safetensors"):
        got = resolve(dataclasses.replace(bare, weights=str(given)))
        assert (got.name, got.depth, got.weights) == (TINY.name, 2, str(old / "encoder.safetensors"))
