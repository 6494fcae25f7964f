"""``launch/torchrun.sh`` with 2 CPU processes gives what one process gives.

embed: the same embeddings (up to row order, which the loader sorts away); select: the
same manifest, row for row; pretrain: the same steps and model, more images per step (each
rank draws its own batches). The 1-process references run in this process (the same
stage ``main``, no launcher), so each test pays for one torchrun start only.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from dataeff.cli import main as cli_main
from dataeff.constants import ENCODER_WEIGHTS
from tests.fixtures import make_shards
from tests.multiproc import free_port

ROOT = Path(__file__).resolve().parents[2]
TORCHRUN = ROOT / "launch" / "torchrun.sh"
LAUNCH_TIMEOUT_S = 300


def torchrun(stage: str, config: str, *overrides: str, nproc: int = 2) -> subprocess.CompletedProcess:
    """``launch/torchrun.sh <stage> <config> <overrides>`` on ``nproc`` CPU processes."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")}
    env.update(
        NPROC_PER_NODE=str(nproc),
        MASTER_PORT=str(free_port()),
        PYTHON=sys.executable,
        OMP_NUM_THREADS="1",
        DATAEFF_DIST_TIMEOUT="120",  # a hung rank fails the test instead of stalling it
        WANDB_MODE="offline",
        WANDB_SILENT="true",
    )
    result = subprocess.run(
        [str(TORCHRUN), stage, config, *overrides],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=LAUNCH_TIMEOUT_S,
    )
    assert result.returncode == 0, f"torchrun {stage} failed ({result.returncode}):\n{result.stderr[-4000:]}"
    return result


def in_process(stage: str, config: str, *overrides: str) -> None:
    """The single-process run of a stage, with one intra-op thread like the torchrun ranks."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert cli_main([stage, "--config", config, *overrides]) == 0
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def pool(tmp_path_factory) -> dict[str, Path]:
    """24 real images in 3 shards, embedded once by 1 process and once by 2."""
    tmp = tmp_path_factory.mktemp("launch")
    shards = make_shards(tmp, n=24, size=48, samples_per_shard=8)
    one, two = tmp / "embed-1", tmp / "embed-2"
    in_process("embed", "configs/embed/tiny.yaml", f"data.shards={shards}", f"out={one}")
    torchrun("embed", "configs/embed/tiny.yaml", f"data.shards={shards}", f"out={two}")
    return {"tmp": tmp, "shards": shards, "embed-1": one, "embed-2": two}


def test_embed_two_ranks_equals_one(pool):
    from dataeff.select.embed import load_embeddings, read_header

    one, two = read_header(pool["embed-1"]), read_header(pool["embed-2"])
    assert len(one["files"]) == 1 and len(two["files"]) == 2, "each rank writes its own file"
    assert {k: v for k, v in one.items() if k not in ("files", "world_size")} == {
        k: v for k, v in two.items() if k not in ("files", "world_size")
    }
    keys1, emb1 = load_embeddings(pool["embed-1"], dtype=np.float16)
    keys2, emb2 = load_embeddings(pool["embed-2"], dtype=np.float16)
    assert len(keys1) == 24
    np.testing.assert_array_equal(keys1, keys2)
    np.testing.assert_array_equal(emb1, emb2)
    # Rank files really split the pool (no rank embedded everything).
    per_rank = [len(np.load(pool["embed-2"] / f)["keys"]) for f in two["files"]]
    assert sorted(per_rank) == [8, 16] and sum(per_rank) == 24


def test_select_two_ranks_equals_one(pool):
    from dataeff.select.manifest import read_selection

    tmp = pool["tmp"]
    common = [f"embeddings={pool['embed-1']}", f"data.shards={pool['shards']}", "report.gallery=false"]
    in_process("select", "configs/select/tiny.yaml", *common, f"out={tmp / 'select-1'}")
    torchrun("select", "configs/select/tiny.yaml", *common, f"out={tmp / 'select-2'}")
    frame1, summary1 = read_selection(tmp / "select-1")
    frame2, summary2 = read_selection(tmp / "select-2")
    pd.testing.assert_frame_equal(frame1, frame2)
    assert 0 < summary1["kept"] < summary1["pool_size"] == 24
    for key in ("method", "ratio", "pool_size", "kept", "kept_fraction", "counts_by_reason"):
        assert summary1[key] == summary2[key], key


def test_pretrain_two_ranks_few_steps(pool):
    from safetensors.numpy import load_file

    tmp = pool["tmp"]
    steps = [
        "trainer.max_steps=3",
        "trainer.checkpoint_every_n_steps=2",
        "trainer.progress_bar=false",
        "panel_every_n_steps=0",
    ]
    common = [f"data.shards={pool['shards']}", "wandb.enabled=false", *steps]
    in_process("pretrain", "configs/pretrain/tiny.yaml", *common, f"out={tmp / 'pretrain-1'}")
    two = torchrun("pretrain", "configs/pretrain/tiny.yaml", *common, f"out={tmp / 'pretrain-2'}")
    assert "(rank 0/2)" in two.stderr, "the Trainer did not join the 2-rank group"
    s1 = json.loads((tmp / "pretrain-1" / "summary.json").read_text())
    s2 = json.loads((tmp / "pretrain-2" / "summary.json").read_text())
    assert s1["steps"] == s2["steps"] == 3
    # Each rank draws its own batches from its half of the pool (the same number of
    # batches per rank, the last of an epoch partial): more images in the same steps.
    assert s1["images_seen"] < s2["images_seen"] <= 2 * s1["images_seen"]
    w1 = load_file(str(tmp / "pretrain-1" / ENCODER_WEIGHTS))
    w2 = load_file(str(tmp / "pretrain-2" / ENCODER_WEIGHTS))
    assert {k: v.shape for k, v in w1.items()} == {k: v.shape for k, v in w2.items()}
    assert all(np.isfinite(v).all() for v in w2.values())
    assert list((tmp / "pretrain-2" / "checkpoints").glob("*.ckpt")), "no checkpoint written by the 2-rank run"
