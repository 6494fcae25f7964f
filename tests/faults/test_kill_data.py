"""kill -9 at seeded random points of shard, embed, select and a tiny sweep; the re-run ends identical.

Each stage first runs clean with :mod:`tests.faults.kill_points` logging every file commit
(``os.replace``) it makes. A seeded draw picks a few commits and a side (just
before or just after the rename); for each, a fresh run is killed there with SIGKILL to
its whole process group, re-run to completion, and its output directory compared with
the clean one (:func:`tests.faults.outputs.differences`: byte for byte, clock fields
aside). The sweep's points are drawn among the commits of its data stages (embedding,
selection, cell records, report); kills inside pre-training and fine-tuning are
tests/faults/test_kill_train.py's.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dataeff import cli
from tests.e2e.test_sweep import make_downstream
from tests.faults.kill_points import install
from tests.faults.outputs import differences, first_difference
from tests.fixtures import REPO, make_raw_tree, shard_tree

#: Seed of the kill-point draws; change it to explore other points.
SEED = 16
CONFIGS = REPO / "configs"
SWEEP_OVERRIDES = [
    "methods=[random]", "ratios=[0.5]", "seeds=[0]", "overlap.enabled=false", "bootstrap.steps=1",
    "pretrain.trainer.max_steps=2", "pretrain.trainer.checkpoint_every_n_steps=2", "pretrain.optim.warmup_steps=0",
    "finetune.trainer.max_steps=2", "finetune.trainer.checkpoint_every_n_steps=2", "finetune.val_every_n_steps=2",
    "finetune.optim.warmup_steps=0",
]  # fmt: skip


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """16 small raw images, their shards (4 per tar), their embeddings, 8 downstream pairs."""
    tmp = tmp_path_factory.mktemp("inputs")
    raw = make_raw_tree(tmp / "raw", n=16, size=32)
    shards = tmp / "shards"
    shard_tree(raw, shards, samples_per_shard=4)
    emb = tmp / "emb"
    assert cli.main(["embed", "--config", str(CONFIGS / "embed/tiny.yaml"), f"data.shards={shards}", f"out={emb}"]) == 0
    return {"raw": raw, "shards": shards, "emb": emb, "down": make_downstream(tmp / "down", n=8, size=32)}


def _killed(kill_at: int, when: str, args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """``dataeff <args>`` in a new session, SIGKILLed with its process group at commit ``kill_at``."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
        # The clean run's thread count (an earlier test may have changed it): float sums depend on it.
        "OMP_NUM_THREADS": str(torch.get_num_threads()),
    }
    cmd = [sys.executable, "-m", "tests.faults.kill_points", str(kill_at), when, "", *args]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=240, start_new_session=True)


def _kill_and_rerun(stage: str, args_for, tmp: Path, points: int, eligible=lambda rel: True) -> None:
    """Clean run, then ``points`` seeded kills, each followed by a re-run, each compared with the clean output.

    Every run writes to ``<tmp>/work/out`` (outputs record their path); the clean one is
    moved to ``<tmp>/ref`` before the next starts.
    """
    work, ref, log = tmp / "work", tmp / "ref", tmp / "commits.jsonl"
    out = work / "out"
    restore = install(0, "before", str(log))  # the clean run in-process, its commits logged
    try:
        assert cli.main(args_for(out)) == 0, f"{stage}: the clean run failed"
    finally:
        restore()
    work.rename(ref)
    commits = [os.path.relpath(json.loads(line), out) for line in log.read_text().splitlines()]
    candidates = [i + 1 for i, rel in enumerate(commits) if eligible(rel)]
    rng = random.Random(f"{stage}-{SEED}")
    for k in sorted(rng.sample(candidates, min(points, len(candidates)))):
        when = rng.choice(["before", "after"])
        where = f"{stage}: killed {when} commit {k} of {len(commits)} ({commits[k - 1]})"
        killed = _killed(k, when, args_for(out), tmp)
        assert killed.returncode == -9, f"{where}: the run was not killed: {killed.stderr[-2000:]}"
        assert cli.main(args_for(out)) == 0, f"{where}: the re-run failed"
        differ = differences(out, ref / "out")
        assert not differ, f"{where}: the re-run's output differs: {first_difference(out, ref / 'out', differ[0])}"
        print(where, "-> identical after the re-run")
        shutil.rmtree(work)


@pytest.mark.timeout(240)
def test_shard_killed_then_rerun_is_identical(inputs: dict[str, Path], tmp_path: Path) -> None:
    def args(out: Path) -> list[str]:
        return [
            "shard", "--config", str(CONFIGS / "shard/tiny.yaml"), f"src={inputs['raw']}", f"out={out}",
            "samples_per_shard=2", "workers=2", "chunksize=2", "progress=false",
        ]  # fmt: skip

    _kill_and_rerun("shard", args, tmp_path, points=2)


@pytest.mark.timeout(240)
def test_embed_killed_then_rerun_is_identical(inputs: dict[str, Path], tmp_path: Path) -> None:
    def args(out: Path) -> list[str]:
        return ["embed", "--config", str(CONFIGS / "embed/tiny.yaml"), f"data.shards={inputs['shards']}", f"out={out}"]

    _kill_and_rerun("embed", args, tmp_path, points=1)


@pytest.mark.timeout(240)
def test_select_killed_then_rerun_is_identical(inputs: dict[str, Path], tmp_path: Path) -> None:
    def args(out: Path) -> list[str]:
        return [
            "select", "--config", str(CONFIGS / "select/tiny.yaml"), "ratio=0.5", "cluster.k=3",
            f"embeddings={inputs['emb']}", f"out={out}",
        ]  # fmt: skip

    _kill_and_rerun("select", args, tmp_path, points=1)


def _data_stage_commit(rel: str) -> bool:
    """A sweep commit outside pre-training and fine-tuning (those are the training kill tests')."""
    parts = Path(rel).parts
    return not ({"bootstrap", "pretrain", "finetune"} & set(parts))


@pytest.mark.timeout(300)
def test_tiny_sweep_killed_then_rerun_is_identical(inputs: dict[str, Path], tmp_path: Path) -> None:
    def args(out: Path) -> list[str]:
        return [
            "sweep", "--config", str(CONFIGS / "sweep/tiny.yaml"), f"out={out}", f"shards={inputs['shards']}",
            f"datasets.tiny.data.root={inputs['down']}", *SWEEP_OVERRIDES,
        ]  # fmt: skip

    _kill_and_rerun("sweep", args, tmp_path, points=1, eligible=_data_stage_commit)
