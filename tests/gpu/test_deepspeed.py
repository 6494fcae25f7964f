"""The GPU path of ``dataeff pretrain``: DeepSpeed ZeRO-2, bf16, fused AdamW, sharded checkpoints.

Runs on one CUDA device (DeepSpeed with a world of 1 still exercises ZeRO-2 partitioning,
bf16 master weights and directory checkpoints); skipped with a reason on CPU machines.
"""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd
import pytest
import torch

pytestmark = pytest.mark.gpu

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU: DeepSpeed ZeRO-2 + bf16 is the GPU-only path", allow_module_level=True)
deepspeed = pytest.importorskip("deepspeed", reason="DeepSpeed is not installed")


from dataeff import pretrain  # noqa: E402
from dataeff.models.encoder import pooled_features  # noqa: E402
from dataeff.models.mae import MAE  # noqa: E402
from dataeff.trainer import find_resume_checkpoint  # noqa: E402
from tests.pretrain_helpers import STEPS, SigtermAt, add_callback, load_exported, tiny_shards  # noqa: E402
from tests.pretrain_helpers import config as cpu_config  # noqa: E402


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return tiny_shards(tmp_path_factory.mktemp("pool"))


def config(shards: Path, out: Path, *extra: str) -> pretrain.PretrainConfig:
    return cpu_config(shards, out, "trainer.accelerator=gpu", "trainer.devices=1", *extra)


def test_deepspeed_bf16_pretraining_export_and_resume(shards, tmp_path, monkeypatch):
    out = tmp_path / "run"
    with monkeypatch.context() as patched:
        add_callback(patched, SigtermAt(5))
        with pytest.raises(SystemExit):
            pretrain.main(config(shards, out))

    ckpt = find_resume_checkpoint(out)
    assert ckpt is not None and ckpt.resolve().is_dir(), "DeepSpeed writes a checkpoint directory"
    assert "step=00000005" in os.path.realpath(ckpt)

    summary = pretrain.main(config(shards, out))
    assert summary["strategy"] == "deepspeed_stage_2" and summary["precision"] == "bf16-mixed"
    assert summary["steps"] == STEPS and summary["images_seen"] == STEPS * 6
    assert summary["resumed_from"] is not None

    metrics = pd.read_csv(out / "metrics.csv")
    assert metrics["images_per_s"].dropna().gt(0).all()
    assert metrics["gpu_mem_gb"].dropna().gt(0).all()
    steps = metrics.dropna(subset=["loss"]).drop_duplicates("step", keep="last")
    assert list(steps["step"]) == list(range(STEPS)), "the resumed run continues the step count"
    lr = steps.set_index("step")["lr"]
    assert lr[5] != lr[0] and lr[7] < lr[5], "the warm-up/cosine schedule continued after resume"

    # the export holds the fp32 master weights and loads in timm with the module's features
    model = load_exported(out)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    mae = MAE.load_for_scoring(out, device="cuda")
    images = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(
            pooled_features(model, images, "cls"), pooled_features(mae.encoder.cpu(), images, "cls")
        )
    assert torch.isfinite(MAE.load_for_scoring(out, device="cuda").reconstruction_loss(images, 0)).all()


def test_fused_adamw_is_used_on_cuda():
    from dataeff.optim import make_adamw

    p = torch.nn.Parameter(torch.zeros(4, device="cuda"))
    opt = make_adamw([p], 1e-3, (0.9, 0.95), 0.05, torch.device("cuda"))
    fused = type(opt).__name__ == "FusedAdam" or opt.defaults.get("fused") is True
    assert fused, f"expected a fused AdamW on CUDA, got {type(opt).__name__} {opt.defaults}"
