"""Segmentation model: shapes, multi-level features, losses, param groups (the schedule: ``test_optim.py``)."""

from __future__ import annotations

import pytest
import timm
import torch

from dataeff.models.segment import (
    SegmentationModel,
    dice_loss,
    level_indices,
    native_prediction,
    param_groups,
    predict_native_batches,
    segmentation_loss,
)


def tiny_vit(img_size: int = 32, patch_size: int = 8, depth: int = 2):
    return timm.create_model(
        "vit_base_patch16_224",
        pretrained=False,
        num_classes=0,
        img_size=img_size,
        patch_size=patch_size,
        depth=depth,
        embed_dim=64,
        num_heads=2,
    )


def test_level_indices_evenly_spaced_ending_at_last_block():
    assert level_indices(12, 4) == [2, 5, 8, 11]
    assert level_indices(24, 4) == [5, 11, 17, 23]
    assert level_indices(2, 4) == [0, 1]
    assert level_indices(1, 4) == [0]
    with pytest.raises(ValueError):
        level_indices(0, 4)


@pytest.mark.parametrize("img_size,patch_size,depth", [(32, 8, 2), (64, 16, 4), (48, 16, 3)])
def test_forward_gives_multiclass_logits_at_input_resolution(img_size, patch_size, depth):
    model = SegmentationModel(tiny_vit(img_size, patch_size, depth), num_classes=5, n_levels=4, channels=16)
    x = torch.randn(3, 3, img_size, img_size)
    logits = model(x)
    assert logits.shape == (3, 5, img_size, img_size)
    assert torch.isfinite(logits).all()


def test_every_parameter_gets_a_gradient():
    # DDP fails on unused parameters: the pruned final norm must not linger.
    model = SegmentationModel(tiny_vit(depth=3), num_classes=3, n_levels=2, channels=16)
    assert model.indices == [1, 2]
    target = torch.randint(0, 3, (2, 32, 32))
    segmentation_loss(model(torch.randn(2, 3, 32, 32)), target).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert missing == []


def test_head_uses_several_depths():
    model = SegmentationModel(tiny_vit(depth=4), num_classes=2, n_levels=2, channels=16)
    assert model.indices == [1, 3]
    x = torch.randn(1, 3, 32, 32)
    out0 = model(x)
    with torch.no_grad():  # perturbing a block *before* the shallow level changes the output
        model.encoder.blocks[1].mlp.fc2.bias.add_(1.0)
    assert not torch.allclose(out0, model(x))


def test_dice_loss_values():
    target = torch.zeros(1, 4, 4, dtype=torch.long)
    target[0, :2] = 1
    perfect = torch.full((1, 2, 4, 4), -20.0)
    perfect[:, 1][target == 1] = 20.0
    perfect[:, 0][target == 0] = 20.0
    assert dice_loss(perfect, target).item() == pytest.approx(0.0, abs=1e-6)
    wrong = -perfect
    # inter 0, denom 8 (pred fg) + 8 (target fg) -> 1 - 1/17
    assert dice_loss(wrong, target).item() == pytest.approx(1 - 1 / 17, abs=1e-5)
    # empty target, empty prediction: defined and zero
    empty = torch.zeros(1, 4, 4, dtype=torch.long)
    bg_logits = torch.stack([torch.full((1, 4, 4), 20.0), torch.full((1, 4, 4), -20.0)], dim=1)
    assert dice_loss(bg_logits, empty).item() == pytest.approx(0.0, abs=1e-6)


def test_segmentation_loss_is_ce_plus_dice():
    logits = torch.randn(2, 3, 8, 8)
    target = torch.randint(0, 3, (2, 8, 8))
    ce = torch.nn.functional.cross_entropy(logits, target)
    assert segmentation_loss(logits, target, 0.0).item() == pytest.approx(ce.item())
    total = ce + 0.5 * dice_loss(logits, target)
    assert segmentation_loss(logits, target, 0.5).item() == pytest.approx(total.item())


def test_param_groups_layer_decay_and_no_decay():
    model = SegmentationModel(tiny_vit(depth=2), num_classes=2, channels=16)
    groups = param_groups(model, lr=1e-3, weight_decay=0.05, layer_decay=0.5)
    n_params = sum(len(g["params"]) for g in groups)
    assert n_params == len(list(model.parameters()))
    by_param = {id(p): g for g in groups for p in g["params"]}
    # depth 2: embeddings scale 0.5^3, block 0 0.5^2, block 1 0.5, head 1
    assert by_param[id(model.encoder.pos_embed)]["lr"] == pytest.approx(1e-3 * 0.125)
    assert by_param[id(model.encoder.pos_embed)]["weight_decay"] == 0.0
    assert by_param[id(model.encoder.blocks[0].attn.qkv.weight)]["lr"] == pytest.approx(1e-3 * 0.25)
    assert by_param[id(model.encoder.blocks[1].attn.qkv.weight)]["lr"] == pytest.approx(1e-3 * 0.5)
    assert by_param[id(model.head.classifier.weight)]["lr"] == pytest.approx(1e-3)
    assert by_param[id(model.head.classifier.weight)]["weight_decay"] == 0.05
    assert by_param[id(model.head.classifier.bias)]["weight_decay"] == 0.0


def test_native_prediction_upsamples_logits_before_the_argmax():
    # 4-px logits: foreground on columns 0-1. At 6 px, bilinear sampling puts the 0/1 boundary
    # exactly between output columns 2 and 3 (source x = (j + 0.5) * 4/6 - 0.5).
    fg = torch.tensor([1.0, 1.0, -1.0, -1.0]).expand(4, 4)
    logits = torch.stack([torch.zeros(4, 4), fg])
    pred = native_prediction(logits, (5, 6))
    assert pred.shape == (5, 6) and pred.dtype == torch.long
    assert pred.tolist() == [[1, 1, 1, 0, 0, 0]] * 5
    # a soft boundary decides by the upsampled scores, not by nearest-neighbour class ids
    soft = torch.stack([torch.zeros(1, 2), torch.tensor([[5.0, -1.0]])])  # nearest: [1, 1, 0, 0]
    assert native_prediction(soft, (1, 4)).tolist() == [[1, 1, 1, 0]]


def test_predict_native_batches_one_map_per_mask_size():
    model = torch.nn.Conv2d(3, 2, 1)
    batch = {"image": torch.randn(2, 3, 8, 8), "native_mask": [torch.zeros(5, 7), torch.zeros(12, 3)]}
    ((_, preds),) = list(predict_native_batches(model, [batch]))
    assert [tuple(p.shape) for p in preds] == [(5, 7), (12, 3)]
