"""Training killed anywhere resumes to the byte-identical result of an uninterrupted run.

Each case runs ``pretrain`` (or ``finetune``) in a child process that is interrupted at a
fixed point by a Trainer callback (SIGKILL, SIGTERM, an exception inside a batch) or by a
``torch.save`` that dies half-way through writing a checkpoint; the run is then started
again with ``resume=auto`` and its exported weights are compared byte for byte with an
uninterrupted run's, and its ``metrics.csv`` must hold every step once.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pandas as pd
import pytest
import torch

from dataeff import finetune, pretrain
from dataeff.config import load_config
from dataeff.constants import BEST_WEIGHTS, ENCODER_WEIGHTS, RESULTS_NAME
from tests.fixtures import REPO
from tests.integration.test_finetune import make_kvasir_pairs
from tests.pretrain_helpers import STEPS, config, tiny_shards

# Child process: the stage with one interruption. {stage}, {args} and {fault} are filled in.
CHILD = """
import os, signal, sys
import pytorch_lightning as pl
import torch
torch.set_num_threads({threads})  # the reference's: a float sum's order depends on the thread count
sys.path.insert(0, {repo!r})
from tests.faults.test_kill_train import stage_config
from dataeff import finetune, pretrain
stage = {stage}
KIND, STEP = {fault!r}

class Fault(pl.Callback):
    def _hit(self, trainer, hook):
        if trainer.global_step != STEP:
            return
        if (KIND, hook) in (("kill-before", "start"), ("kill-after", "end")):
            os.kill(os.getpid(), signal.SIGKILL)
        if (KIND, hook) == ("sigterm", "end"):
            os.kill(os.getpid(), signal.SIGTERM)
        if (KIND, hook) == ("error-mid-batch", "optimizer"):
            raise RuntimeError("injected: a peer died during this step's gradient all-reduce")

    def on_train_batch_start(self, trainer, *args):
        self._hit(trainer, "start")

    def on_train_batch_end(self, trainer, *args):
        self._hit(trainer, "end")

    def on_before_optimizer_step(self, trainer, *args):
        self._hit(trainer, "optimizer")

if KIND == "kill-mid-save":
    real_save = torch.save
    def dying_save(obj, target, *args, **kwargs):
        real_save(obj, target, *args, **kwargs)
        name = getattr(target, "name", target)  # a path, or the open temp file
        if f"step={{STEP:08d}}" in str(name):
            if hasattr(target, "flush"):
                target.flush()
            data = open(name, "rb").read()
            open(name, "wb").write(data[: len(data) // 2])
            os.kill(os.getpid(), signal.SIGKILL)
    torch.save = dying_save

build = stage.build_trainer
stage.build_trainer = lambda *a, extra_callbacks=(), **k: build(*a, extra_callbacks=[*extra_callbacks, Fault()], **k)
stage.main(stage_config({stage_name!r}, *{args!r}))
"""

EXIT = {
    "kill-before": -signal.SIGKILL,
    "kill-after": -signal.SIGKILL,
    "kill-mid-save": -signal.SIGKILL,
    "sigterm": 0,  # Lightning's SIGTERMException is a SystemExit without a code (the CLI is not involved)
    "error-mid-batch": 1,
}


def stage_config(stage: str, data: str, out: str) -> object:
    """The tiny config of ``stage`` on ``data`` writing to ``out`` (also used by the child process)."""
    if stage == "pretrain":
        return config(Path(data), Path(out))
    overrides = [
        f"data.root={data}",
        f"out={out}",
        "encoder.allow_random_init=true",
        "trainer.max_steps=12",
        "trainer.checkpoint_every_n_steps=4",
        "val_every_n_steps=4",
        "data.batch_size=4",
        "keep_checkpoints=true",
        "n_predictions=0",
    ]
    return load_config(finetune.FinetuneConfig, str(REPO / "configs" / "finetune" / "tiny.yaml"), overrides)


def _interrupt(stage: str, data: Path, out: Path, fault: tuple[str, int]) -> None:
    module = "pretrain" if stage == "pretrain" else "finetune"
    code = CHILD.format(
        repo=str(REPO),
        stage=module,
        stage_name=stage,
        fault=fault,
        args=(str(data), str(out)),
        threads=torch.get_num_threads(),
    )
    env = {**os.environ, "WANDB_MODE": "offline"}
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == EXIT[fault[0]], proc.stderr[-3000:]


def _steps_logged(out: Path, column: str) -> list[int]:
    table = pd.read_csv(out / "metrics.csv")
    return [int(s) for s in table.dropna(subset=[column])["step"]]


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return tiny_shards(tmp_path_factory.mktemp("pool"))


@pytest.fixture(scope="module")
def pretrained(shards, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("pretrain-ref") / "run"
    pretrain.main(stage_config("pretrain", str(shards), str(out)))
    return out


@pytest.mark.parametrize(
    ("fault", "resumed_from"),
    [
        (("kill-before", 2), None),  # before the first checkpoint: starts over
        (("kill-after", 4), "step=00000003"),  # between checkpoints
        (("kill-mid-save", 6), "step=00000003"),  # half of step 6's checkpoint on disk
        (("kill-before", 7), "step=00000006"),  # just after a checkpoint
        (("sigterm", 5), "step=00000005"),  # pre-emption: a checkpoint of the finished step 5
        (("error-mid-batch", 5), "step=00000003"),  # no checkpoint of the half-done step 5
    ],
    ids=lambda v: "-".join(map(str, v)) if isinstance(v, tuple) else str(v),
)
def test_pretrain_resumes_to_the_uninterrupted_result(shards, pretrained, tmp_path, monkeypatch, fault, resumed_from):
    monkeypatch.setenv("WANDB_MODE", "offline")
    out = tmp_path / "run"
    _interrupt("pretrain", shards, out, fault)
    assert not list((out / "checkpoints").glob(".*")) or fault[0] == "kill-mid-save"
    summary = pretrain.main(stage_config("pretrain", str(shards), str(out)))
    assert (summary["resumed_from"] or "").find(resumed_from or "") >= 0 and bool(summary["resumed_from"]) == bool(
        resumed_from
    ), summary["resumed_from"]
    assert (out / ENCODER_WEIGHTS).read_bytes() == (pretrained / ENCODER_WEIGHTS).read_bytes()
    assert _steps_logged(out, "loss") == list(range(STEPS))
    assert not list((out / "checkpoints").glob(".*")), "a partial save was left behind"


def test_pretrain_truncated_newest_checkpoint_falls_back(shards, pretrained, tmp_path, monkeypatch, caplog):
    """A newest checkpoint cut short (as Lightning's cross-filesystem copy left them) is skipped, not fatal."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    out = tmp_path / "run"
    _interrupt("pretrain", shards, out, ("kill-before", 7))
    newest = out / "checkpoints" / "step=00000006.ckpt"
    newest.write_bytes(newest.read_bytes()[:1000])
    summary = pretrain.main(stage_config("pretrain", str(shards), str(out)))
    assert summary["resumed_from"].endswith("step=00000003.ckpt")
    assert f"skipping checkpoint {newest}" in caplog.text
    assert (out / ENCODER_WEIGHTS).read_bytes() == (pretrained / ENCODER_WEIGHTS).read_bytes()


@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> Path:
    return make_kvasir_pairs(tmp_path_factory.mktemp("pairs") / "kvasir")


def test_finetune_killed_mid_run_resumes_to_the_uninterrupted_result(pairs, tmp_path_factory, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    reference, out = tmp_path_factory.mktemp("ft-ref") / "run", tmp_path_factory.mktemp("ft-killed") / "run"
    expected = finetune.main(stage_config("finetune", str(pairs), str(reference)))
    _interrupt("finetune", pairs, out, ("kill-after", 6))  # after the step-4 checkpoint and validation
    results = finetune.main(stage_config("finetune", str(pairs), str(out)))
    assert results["resumed_from"].endswith("step=00000004.ckpt")
    assert (out / BEST_WEIGHTS).read_bytes() == (reference / BEST_WEIGHTS).read_bytes()
    varying = ("train_time_s", "resumed_from")
    assert {k: v for k, v in results.items() if k not in varying} == {
        k: v for k, v in expected.items() if k not in varying
    }
    assert json.loads((out / RESULTS_NAME).read_text())["best_step"] == expected["best_step"]
    assert _steps_logged(out, "train/loss") == _steps_logged(reference, "train/loss")
