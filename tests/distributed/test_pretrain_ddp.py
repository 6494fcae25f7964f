"""MAE pre-training on 2 real gloo ranks (ddp on CPU) against the 1-process run of the same global batch."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pandas as pd
import pytest
import pytorch_lightning as pl

from dataeff.constants import ENCODER_WEIGHTS
from tests.fixtures import REPO, make_shards
from tests.multiproc import run_ranks

TINY = str(REPO / "configs" / "pretrain" / "tiny.yaml")
N, STEPS, GLOBAL_BATCH = 24, 8, 12


class _KeyRecorder(pl.Callback):
    """Keys of every batch this rank trains on, with the epoch they belong to."""

    def __init__(self) -> None:
        self.seen: list[tuple[int, str]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.seen += [(trainer.current_epoch, k) for k in batch["key"]]


def _pretrain(rank: int, world: int, shards: str, out: str) -> dict:
    import os

    os.environ["WANDB_MODE"] = "offline"
    from dataeff import pretrain
    from dataeff.config import load_config

    recorder = _KeyRecorder()
    original = pretrain.build_trainer
    pretrain.build_trainer = lambda *a, extra_callbacks=(), **k: original(
        *a, extra_callbacks=[*extra_callbacks, recorder], **k
    )
    cfg = load_config(
        pretrain.PretrainConfig,
        TINY,
        [
            f"data.shards={shards}",
            f"out={out}",
            f"trainer.max_steps={STEPS}",
            f"data.batch_size={GLOBAL_BATCH // world}",
            "trainer.progress_bar=false",
            "trainer.checkpoint_every_n_steps=4",
            "panel_every_n_steps=0",
        ],
    )
    summary = pretrain.main(cfg)
    # parameters after training, as seen by this rank (DDP must keep them identical)
    import torch

    blob = torch.load(Path(out) / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    digest = hashlib.sha256(b"".join(v.numpy().tobytes() for _, v in sorted(blob["state_dict"].items()))).hexdigest()
    return {"summary": summary, "seen": recorder.seen, "digest": digest, "rank": rank}


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return make_shards(tmp_path_factory.mktemp("pool"), n=N, size=40, samples_per_shard=7)


def _by_epoch(seen: list[tuple[int, str]]) -> dict[int, list[str]]:
    out: dict[int, list[str]] = {}
    for epoch, key in seen:
        out.setdefault(epoch, []).append(key)
    return out


def test_two_rank_ddp_pretraining(shards, tmp_path):
    two = run_ranks(_pretrain, world=2, args=(str(shards), str(tmp_path / "ddp")))
    one = _pretrain(0, 1, str(shards), str(tmp_path / "single"))
    all_keys = set(pd.read_parquet(shards / "index.parquet")["key"])

    s0, s1 = two[0]["summary"], two[1]["summary"]
    assert s0 == s1 and s0["world_size"] == 2 and s0["strategy"] == "ddp"
    assert s0["steps"] == one["summary"]["steps"] == STEPS
    assert s0["images_seen"] == one["summary"]["images_seen"] == STEPS * GLOBAL_BATCH
    assert two[0]["digest"] == two[1]["digest"], "ranks ended with different weights"

    # every epoch: the ranks' samples are disjoint and together are the whole pool,
    # exactly the samples the single process sees in that epoch
    e0, e1, e_one = _by_epoch(two[0]["seen"]), _by_epoch(two[1]["seen"]), _by_epoch(one["seen"])
    full_epochs = [e for e in e_one if len(e_one[e]) == N]
    assert len(full_epochs) >= 2
    for epoch in full_epochs:
        assert not set(e0[epoch]) & set(e1[epoch]), f"ranks share samples in epoch {epoch}"
        assert len(e0[epoch]) == len(e1[epoch]) == N // 2
        assert set(e0[epoch]) | set(e1[epoch]) == set(e_one[epoch]) == all_keys

    metrics = pd.read_csv(tmp_path / "ddp" / "metrics.csv").dropna(subset=["loss"])
    losses = metrics.drop_duplicates("step", keep="last")["loss"].to_numpy()
    assert len(losses) == STEPS and losses[-3:].mean() < losses[:3].mean(), f"loss did not go down: {losses}"
    assert (tmp_path / "ddp" / ENCODER_WEIGHTS).is_file()
    assert json.loads((tmp_path / "ddp" / "summary.json").read_text())["world_size"] == 2
