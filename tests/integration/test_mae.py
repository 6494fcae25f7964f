"""The MAE objective learns: a few optimiser steps on a fixed batch lower its loss."""

from __future__ import annotations

import torch

from dataeff.models import mae as M
from tests.unit.test_mae import tiny_model


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
