"""``dataeff finetune`` in one process on 24 real Kvasir-SEG pairs at 64 px with a tiny random ViT.

One run through the CLI (module-scoped), then: the head learns (beats the untrained model
on the same test split), results.json has the documented fields, the outputs exist, and a
second run is skipped.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dataeff import cli, finetune
from dataeff.config import ConfigError, load_config
from dataeff.constants import ENCODER_WEIGHTS, SPLIT_FORMAT
from dataeff.data import downstream
from dataeff.finetune import FinetuneConfig, build_model, evaluate_share, main
from dataeff.metrics import segmentation_scores
from tests.fixtures import tiny_encoder_config
from tests.pretrain_helpers import SigtermAt

REPO = Path(__file__).resolve().parents[2]
KVASIR = REPO / "data" / "kvasir-seg"
TINY = REPO / "configs" / "finetune" / "tiny.yaml"
N_PAIRS, SIZE = 24, 64


def make_kvasir_pairs(root: Path, n: int = N_PAIRS, size: int = SIZE) -> Path:
    """The first ``n`` Kvasir-SEG pairs, long side ``size`` px, in the Kvasir layout, with a split.json."""
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    stems = []
    for path in sorted((KVASIR / "images").glob("*.jpg"))[:n]:
        image = Image.open(path).convert("RGB")
        mask = Image.open(KVASIR / "masks" / f"{path.stem}.png").convert("L")
        scale = size / max(image.size)
        wh = (round(image.width * scale), round(image.height * scale))
        image.resize(wh, Image.Resampling.BICUBIC).save(root / "images" / f"{path.stem}.jpg", quality=90)
        mask.resize(wh, Image.Resampling.NEAREST).save(root / "masks" / f"{path.stem}.png")
        stems.append(path.stem)
    # Fixed split: 14 train / 4 val / 6 test.
    split = {"format": SPLIT_FORMAT, "seed": 0, "train": stems[:14], "val": stems[14:18], "test": stems[18:]}
    (root / "split.json").write_text(json.dumps(split))
    return root


def overrides(data: Path, out: Path) -> list[str]:
    return [f"data.root={data}", f"out={out}", "encoder.allow_random_init=true", "trainer.max_steps=30"]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("WANDB_SILENT", "true")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops: thread hand-offs cost more than they save on a busy CPU
    try:
        tmp = tmp_path_factory.mktemp("finetune")
        data = make_kvasir_pairs(tmp / "kvasir")
        out = tmp / "run"
        assert cli.main(["finetune", "--config", str(TINY), *overrides(data, out)]) == 0
        yield data, out
    finally:
        torch.set_num_threads(threads)


def test_results_json_fields(finished_run):
    data, out = finished_run
    results = json.loads((out / "results.json").read_text())
    for key in ("miou", "dice", "fg_iou", "per_class_iou", "n_test", "dataset", "best_val_miou", "confusion_matrix"):
        assert key in results, key
    assert 0.0 <= results["miou"] <= 1.0  # a fraction, not a percentage
    assert len(results["per_class_iou"]) == 2
    assert results["n_test"] == 6 and results["dataset"] == "kvasir"
    cm = results["confusion_matrix"]
    # scored at native resolution: every pixel of every test mask, at its own size, counted once
    native = sum(Image.open(p).size[0] * Image.open(p).size[1] for p in sorted((data / "masks").glob("*.png"))[18:])
    assert results["scoring"] == "native" and sum(map(sum, cm)) == native != 6 * SIZE * SIZE
    per_image = results["per_image"]
    assert per_image["n"] == 6 and per_image["both_empty"] == "scored 1.0"
    lines = (out / "per_image.csv").read_text().splitlines()
    assert lines[0] == "file,dice,iou" and len(lines) == 7 and lines[1].split(",")[0].endswith(".jpg")
    values = [[float(v) for v in line.split(",")[1:]] for line in lines[1:]]
    assert per_image["dice_mean"] == pytest.approx(sum(d for d, _ in values) / 6, abs=1e-5)
    assert per_image["iou_mean"] == pytest.approx(sum(i for _, i in values) / 6, abs=1e-5)
    assert (results["encoder"], results["encoder_sha256"], results["seed"]) == ("random-init", None, 0)
    arch = {"name": "vit_tiny_patch16_224", "img_size": 64, "patch_size": 8, "depth": 2, "embed_dim": 64}
    assert results["encoder_arch"] == {**arch, "num_heads": 2}  # the shape a from-scratch reference must match
    assert results["miou"] == pytest.approx(segmentation_scores(torch.tensor(cm))["miou"])
    assert results["miou"] == pytest.approx(sum(results["per_class_iou"]) / 2)
    for name in ("predictions.png", "config.yaml", "model.safetensors", "metrics.csv"):
        assert (out / name).is_file(), name
    assert not (out / "checkpoints").exists()  # keep_checkpoints=false
    with Image.open(out / "predictions.png") as png:
        assert png.width > 200 and png.height > 200


def test_head_learns(finished_run):
    data, out = finished_run
    results = json.loads((out / "results.json").read_text())
    cfg = load_config(FinetuneConfig, str(TINY), overrides(data, out))
    torch.manual_seed(cfg.seed)
    untrained = build_model(cfg)
    test_pairs = downstream.find_pairs(data, "kvasir")[18:]
    cm, _ = evaluate_share(untrained, test_pairs, cfg.data, rank=0, world_size=1, device=torch.device("cpu"))
    baseline = segmentation_scores(cm)
    miou0 = 0.0 if math.isnan(baseline["miou"]) else baseline["miou"]
    assert results["miou"] > miou0 + 0.05, (results["miou"], miou0)
    assert results["fg_iou"] > 0.05


def test_second_run_skips(finished_run):
    data, out = finished_run
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.is_file()}
    cfg = load_config(FinetuneConfig, str(TINY), overrides(data, out))
    results = main(cfg)
    assert results == json.loads((out / "results.json").read_text())
    after = {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.is_file()}
    assert after == before  # nothing rewritten, not even config.yaml


def test_rerun_with_another_config_or_damaged_weights_is_not_skipped(finished_run, caplog):
    data, out = finished_run
    with pytest.raises(ConfigError, match=r"optim\.lr=0\.002 \(now 0\.003\).*overwrite=true"):
        main(load_config(FinetuneConfig, str(TINY), [*overrides(data, out), "optim.lr=0.003"]))
    assert not (out / "checkpoints").exists()  # refused before any work
    from dataeff.finetune import _finished

    weights = (out / "model.safetensors").read_bytes()
    (out / "model.safetensors").write_bytes(weights[:-8])
    try:
        with caplog.at_level("WARNING", logger="dataeff"):
            assert _finished(out) is None  # a damaged output is redone, not skipped
        assert "model.safetensors has" in caplog.text
    finally:
        (out / "model.safetensors").write_bytes(weights)
    assert _finished(out) == json.loads((out / "results.json").read_text())


def test_bad_config_fails_before_work(tmp_path):
    with pytest.raises(ConfigError, match="warmup"):
        load_config(FinetuneConfig, str(TINY), ["optim.warmup_steps=100", "trainer.max_steps=10"])
    with pytest.raises(ConfigError, match="class_names"):
        load_config(FinetuneConfig, str(TINY), ["class_names=[a,b,c]"])
    cfg = load_config(FinetuneConfig, str(TINY), [f"data.root={tmp_path}", f"out={tmp_path / 'o'}"])
    with pytest.raises(ConfigError, match="encoder"):
        main(cfg)  # no weights and random init not allowed
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_interrupted_run_resumes_from_checkpoint(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        data = make_kvasir_pairs(tmp_path / "kvasir")
        out = tmp_path / "run"
        common = overrides(data, out) + ["optim.warmup_steps=1", "val_every_n_steps=3", "n_predictions=1"]
        common += ["trainer.max_steps=12"]
        # Killed at step 6 (SIGTERM, as SLURM pre-empts): checkpoints and best weights stay, no results.json.
        original = finetune.build_trainer
        monkeypatch.setattr(
            finetune, "build_trainer", lambda *a, **k: original(*a, extra_callbacks=[SigtermAt(6)], **k)
        )
        with pytest.raises(SystemExit):
            main(load_config(FinetuneConfig, str(TINY), common))
        monkeypatch.setattr(finetune, "build_trainer", original)
        assert not (out / "results.json").exists() and (out / "model.safetensors").is_file()
        ckpts = sorted((out / "checkpoints").glob("*.ckpt"))
        states = [torch.load(c, map_location="cpu", weights_only=True) for c in ckpts]
        assert ckpts and all(state["global_step"] == 6 for state in states)
        best_before = states[0]["dataeff_best"]["miou"]
        second = main(load_config(FinetuneConfig, str(TINY), common))
    finally:
        torch.set_num_threads(threads)
    assert second["steps"] == 12
    assert second["resumed_from"] is not None and Path(second["resumed_from"]) in ckpts
    # The resumed run kept the earlier best score as its bar (restored from the checkpoint).
    assert second["best_val_miou"] >= best_before


@pytest.mark.gpu
def test_finetune_on_gpu_with_deepspeed(tmp_path, monkeypatch):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU: exercises strategy=deepspeed_stage_2 with bf16-mixed")
    monkeypatch.setenv("WANDB_MODE", "offline")
    data = make_kvasir_pairs(tmp_path / "kvasir")
    out = tmp_path / "run"
    cfg = load_config(
        FinetuneConfig, str(TINY), overrides(data, out) + ["trainer.accelerator=gpu", "trainer.devices=1"]
    )
    results = main(cfg)
    assert results["strategy"] == "deepspeed_stage_2"
    assert 0.0 <= results["miou"] <= 1.0 and (out / "predictions.png").is_file()


def test_rank_shares_of_the_test_set_sum_to_the_whole(tmp_path):
    data = make_kvasir_pairs(tmp_path / "kvasir", n=7, size=32)
    cfg = load_config(
        FinetuneConfig,
        str(TINY),
        [f"data.root={data}", "encoder.allow_random_init=true", "data.image_size=32", "data.batch_size=2"],
    )
    torch.manual_seed(0)
    model = build_model(cfg)
    pairs = downstream.find_pairs(data, "kvasir")
    whole, rows = evaluate_share(model, pairs, cfg.data, rank=0, world_size=1, device=torch.device("cpu"))
    shares = [
        evaluate_share(model, pairs, cfg.data, rank=r, world_size=3, device=torch.device("cpu")) for r in range(3)
    ]
    assert (sum(cm for cm, _ in shares) == whole).all()  # 7 pairs over 3 ranks: 3 + 2 + 2, none repeated
    assert sorted(r["file"] for _, part in shares for r in part) == sorted(r["file"] for r in rows)
    native = sum(Image.open(m).size[0] * Image.open(m).size[1] for _, _, m in pairs)
    assert whole.sum() == native  # native pixels, not 7 x 32 x 32


class _LeftHalf(torch.nn.Module):
    """Predicts foreground on the left half of its input, whatever the image."""

    def __init__(self) -> None:
        super().__init__()
        self.p = torch.nn.Parameter(torch.zeros(()))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        b, _, h, w = images.shape
        fg = torch.where(torch.arange(w) < w // 2, 1.0, -1.0).expand(b, h, w)
        return torch.stack([torch.zeros_like(fg), fg], dim=1) + self.p


def test_test_scores_at_native_resolution_hand_computed(tmp_path):
    """Input 32 px, masks 48 x 40: the left-half prediction upsampled to 48 columns is exactly columns 0..23."""
    root = tmp_path / "d"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for name, cols in (("a", slice(0, 24)), ("b", slice(12, 36)), ("c", slice(0, 0))):
        Image.new("RGB", (48, 40)).save(root / "images" / f"{name}.jpg")
        mask = np.zeros((40, 48), dtype=np.uint8)
        mask[:, cols] = 255
        Image.fromarray(mask).save(root / "masks" / f"{name}.png")
    cfg = load_config(FinetuneConfig, str(TINY), [f"data.root={root}", "data.image_size=32", "data.batch_size=2"])
    pairs = downstream.find_pairs(root, "kvasir")
    cm, rows = evaluate_share(_LeftHalf(), pairs, cfg.data, rank=0, world_size=1, device=torch.device("cpu"))
    # per image, 40 rows: a = exact (24 TP cols); b = 12 TP cols, 12 FP, 12 FN; c = 24 FP cols, empty mask
    assert cm.tolist() == [[40 * (24 + 12 + 24), 40 * (12 + 24)], [40 * 12, 40 * (24 + 12)]]
    by_file = {r["file"]: (r["dice"], r["iou"]) for r in rows}
    assert by_file["a.jpg"] == (1.0, 1.0) and by_file["c.jpg"] == (0.0, 0.0)
    assert by_file["b.jpg"] == pytest.approx((2 * 12 / 48, 12 / 36))
    assert not any(r["both_empty"] for r in rows)


def test_seed_sets_the_random_init_and_results_name_the_weights(tmp_path):
    from dataeff.files import file_sha256
    from dataeff.finetune import encoder_record
    from dataeff.models.encoder import build_encoder
    from dataeff.pretrain import export_encoder

    scratch = ["encoder.weights=''", "encoder.allow_random_init=true"]
    a, b, c = (build_model(load_config(FinetuneConfig, str(TINY), [*scratch, f"seed={seed}"])) for seed in (0, 0, 1))
    qkv = [m.encoder.blocks[0].attn.qkv.weight for m in (a, b, c)]
    assert torch.equal(qkv[0], qkv[1]) and not torch.equal(qkv[0], qkv[2])
    enc_cfg = tiny_encoder_config(32)
    export_encoder(build_encoder(enc_cfg), enc_cfg, tmp_path / "pretrain")
    record = encoder_record(load_config(FinetuneConfig, str(TINY), [f"encoder={tmp_path / 'pretrain'}"]).encoder)
    weights = tmp_path / "pretrain" / ENCODER_WEIGHTS
    assert record["encoder"] == str(weights) and record["encoder_sha256"] == file_sha256(weights)


def test_build_model_from_a_pretrain_export_at_another_size(tmp_path):
    from dataeff.models.encoder import build_encoder
    from dataeff.pretrain import export_encoder

    enc_cfg = tiny_encoder_config(32)
    torch.manual_seed(3)
    pretrained = build_encoder(enc_cfg)
    export_encoder(pretrained, enc_cfg, tmp_path / "pretrain")
    # encoder=<pretrain dir> shorthand; name and shape come from encoder/config.json; fine-tune at 64 px.
    cfg = load_config(FinetuneConfig, str(TINY), [f"encoder={tmp_path / 'pretrain'}", "data.image_size=64"])
    model = build_model(cfg)
    assert torch.equal(model.encoder.blocks[1].attn.qkv.weight, pretrained.blocks[1].attn.qkv.weight)
    assert model.encoder.pos_embed.shape[1] == 1 + (64 // 8) ** 2  # positions resized 4x4 -> 8x8
    assert model(torch.randn(2, 3, 64, 64)).shape == (2, 2, 64, 64)
