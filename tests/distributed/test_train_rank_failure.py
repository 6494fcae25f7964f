"""A rank that dies or stalls mid-training makes the survivor exit 3 naming its rank and the collective.

As in ``test_rank_failure.py`` (select), two ranks of the real CLI are started as plain
processes with the torchrun variables set by hand. Rank 1 parks at the start of optimiser
step 2 (a Trainer callback): rank 0 has run that step's forward and backward and waits in
DDP's gradient all-reduce (the last checkpoint is step 2's). The test SIGKILLs rank 1 (a crashed node) or leaves it
parked (a hung GPU); rank 0 must exit 3 with one line, no traceback, and no checkpoint
of the half-done step.
"""

from __future__ import annotations

import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.integration.test_finetune import make_kvasir_pairs
from tests.multiproc import start_parked_pair, wait_parked
from tests.pretrain_helpers import tiny_shards

TIMEOUT_S = 10  # DATAEFF_DIST_TIMEOUT of the ranks
START_LIMIT_S = 240  # process start-up and the first steps on a loaded CI machine
PARK_STEP = 3

# Rank 1: run the real CLI, but park at the start of step PARK_STEP.
PARKED_RANK = """
import os, sys, time
from pathlib import Path
import pytorch_lightning as pl
from dataeff import cli, finetune, pretrain

class Park(pl.Callback):
    def on_train_batch_start(self, trainer, *args):
        if trainer.global_step == int(os.environ["PARK_STEP"]):
            Path(os.environ["PARKED_MARKER"]).write_text(str(os.getpid()))
            time.sleep(3600)

for stage in (pretrain, finetune):
    def patched(*a, _build=stage.build_trainer, extra_callbacks=(), **k):
        return _build(*a, extra_callbacks=[*extra_callbacks, Park()], **k)
    stage.build_trainer = patched
sys.exit(cli.main(sys.argv[1:]))
"""


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("train-rank-failure")
    return {"tmp": tmp, "shards": tiny_shards(tmp / "pool"), "pairs": make_kvasir_pairs(tmp / "pairs")}


def _stage_args(inputs: dict[str, Path], stage: str, out: Path) -> list[str]:
    common = [f"out={out}", "trainer.progress_bar=false", "wandb.enabled=false", "trainer.checkpoint_every_n_steps=2"]
    if stage == "pretrain":
        return ["pretrain", "--config", "configs/pretrain/tiny.yaml", f"data.shards={inputs['shards']}", *common]
    return [
        "finetune",
        "--config",
        "configs/finetune/tiny.yaml",
        f"data.root={inputs['pairs']}",
        "encoder.allow_random_init=true",
        "trainer.max_steps=8",
        "data.batch_size=4",
        *common,
    ]


def _start_pair(inputs: dict[str, Path], stage: str, name: str) -> tuple[subprocess.Popen, subprocess.Popen, Path]:
    out, marker = inputs["tmp"] / name, inputs["tmp"] / f"{name}.parked"
    args = _stage_args(inputs, stage, out)
    rank0, rank1 = start_parked_pair(args, PARKED_RANK, marker, TIMEOUT_S, PARK_STEP=str(PARK_STEP))
    return rank0, rank1, marker


def _wait_parked(rank0: subprocess.Popen, rank1: subprocess.Popen, marker: Path) -> None:
    wait_parked(rank0, rank1, marker, START_LIMIT_S, "the parking step")


def _run(inputs: dict[str, Path], stage: str, kill: bool) -> tuple[int, str, float]:
    name = f"{stage}-{'killed' if kill else 'stalled'}"
    rank0, rank1, marker = _start_pair(inputs, stage, name)
    try:
        _wait_parked(rank0, rank1, marker)
        if kill:
            rank1.send_signal(signal.SIGKILL)
        since = time.monotonic()
        _, err = rank0.communicate(timeout=TIMEOUT_S + 90)
        elapsed = time.monotonic() - since
    finally:
        rank0.kill()
        rank1.kill()
        rank1.wait()
    # Step PARK_STEP never finished: the newest checkpoint is the periodic one before it.
    ckpts = sorted(p.name for p in (inputs["tmp"] / name / "checkpoints").glob("step=*.ckpt"))
    assert ckpts == [f"step={PARK_STEP - 1:08d}.ckpt"], ckpts
    return rank0.returncode, err, elapsed


def _assert_named(code: int, err: str) -> None:
    assert code == 3, err[-3000:]
    # Where rank 0 waits depends on the model: DDP sends module buffers before each forward.
    assert re.search(
        r"rank 0/2: collective '(buffer broadcast \(DDP forward\)|gradient all-reduce \(DDP backward\))' failed", err
    ), err[-3000:]
    assert "Traceback" not in err  # a message, not a stack dump


@pytest.mark.parametrize("stage", ["pretrain", "finetune"])
def test_killed_rank_makes_training_survivor_exit_3(inputs, stage):
    code, err, elapsed = _run(inputs, stage, kill=True)
    _assert_named(code, err)
    assert "another rank probably died" in err
    assert elapsed < TIMEOUT_S + 60, f"survivor took {elapsed:.1f}s to fail"


def test_stalled_rank_makes_training_survivor_time_out(inputs):
    code, err, elapsed = _run(inputs, "pretrain", kill=False)
    _assert_named(code, err)
    assert "stalled past the timeout" in err
    assert TIMEOUT_S - 2 < elapsed < TIMEOUT_S + 60, f"survivor failed after {elapsed:.1f}s"
