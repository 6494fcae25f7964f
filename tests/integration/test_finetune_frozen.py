"""Frozen-encoder evaluation (freeze_encoder) and low-label fine-tuning (data.n_train) end to end."""

from __future__ import annotations

import json
import os

import torch
from safetensors.torch import load_file

from dataeff import cli
from dataeff.config import load_config
from dataeff.constants import BEST_WEIGHTS, ENCODER_WEIGHTS, RESULTS_NAME
from dataeff.finetune import FinetuneConfig, build_model
from dataeff.models.encoder import build_encoder
from dataeff.models.segment import param_groups
from dataeff.pretrain import export_encoder
from tests.fixtures import tiny_encoder_config
from tests.integration.test_finetune import TINY, make_kvasir_pairs


def test_frozen_encoder_leaves_the_optimiser():
    cfg = load_config(FinetuneConfig, str(TINY), ["encoder.allow_random_init=true", "freeze_encoder=true"])
    model = build_model(cfg)
    assert not any(p.requires_grad for p in model.encoder.parameters())
    trained = {id(p) for g in param_groups(model, 1e-3, 0.01) for p in g["params"]}
    assert trained == {id(p) for p in model.head.parameters()}
    unfrozen = build_model(load_config(FinetuneConfig, str(TINY), ["encoder.allow_random_init=true"]))
    assert all(p.requires_grad for p in unfrozen.encoder.parameters())


def test_frozen_low_label_run_keeps_the_pretrained_encoder(tmp_path):
    os.environ.setdefault("WANDB_MODE", "offline")
    data = make_kvasir_pairs(tmp_path / "kvasir")
    enc_cfg = tiny_encoder_config(64)
    export_encoder(build_encoder(enc_cfg), enc_cfg, tmp_path / "pretrain")
    out = tmp_path / "run"
    args = [f"encoder={tmp_path / 'pretrain'}", f"data.root={data}", f"out={out}", "freeze_encoder=true"]
    args += ["data.n_train=5", "trainer.max_steps=6", "optim.warmup_steps=1", "val_every_n_steps=3", "n_predictions=0"]
    assert cli.main(["finetune", "--config", str(TINY), *args]) == 0
    results = json.loads((out / RESULTS_NAME).read_text())
    assert results["n_train"] == 5 and results["encoder_frozen"] is True and results["steps"] == 6
    before = load_file(os.fspath(tmp_path / "pretrain" / ENCODER_WEIGHTS))
    after = load_file(os.fspath(out / BEST_WEIGHTS))
    shared = [k for k in before if f"encoder.{k}" in after]
    assert shared and all(torch.equal(before[k], after[f"encoder.{k}"]) for k in shared)
