"""launch/slurm against a real single-node SLURM: all-or-nothing submission, pre-emption, exact resume.

The cluster (munged, slurmctld, slurmd on localhost; tests/slurm_cluster.py) is started once
for this module; where it cannot start, every test here is skipped with the reason. Select
these tests with ``pytest -m slurm``.

The pre-emption run submits the tiny sweep restricted to one unit (random at 50%, seed 0) with
``launch/slurm/sweep.sh`` and stops its pretrain job twice while it trains: first the way a
time limit does (``USR1`` to the batch shell, whose trap runs ``scontrol requeue``), then the
way a pre-emption does (``scontrol requeue`` from outside). Every job must finish, and the
sweep's encoders and report numbers must equal those of the same sweep run uninterrupted.
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest

from dataeff.constants import CHECKPOINT_DIR, ENCODER_WEIGHTS
from tests.e2e.test_sweep import make_downstream
from tests.fixtures import make_shards
from tests.slurm_cluster import PARTITION, ClusterUnavailable, SlurmCluster, job_env, start_cluster

pytestmark = pytest.mark.slurm

ROOT = Path(__file__).resolve().parents[2]
SWEEP_SH = ROOT / "launch" / "slurm" / "sweep.sh"
TINY = "configs/sweep/tiny.yaml"
UNIT = "random-r0.5/seed0"
PRETRAIN_JOB = "dataeff-sweep-random-r0.5-s0-pretrain"
# Long enough to be stopped twice mid-training (10-50 ms a step on a CPU), with checkpoints between.
STEPS, EVERY = 600, 100
# Columns that hold wall-clock time or this run's own paths: everything else must match.
RUN_SPECIFIC = {"pretrain_hours", "wall_s", "encoder", "encoder_init"}
CHECKPOINT = re.compile(r"step=(\d+)\.ckpt")


@pytest.fixture(scope="module")
def cluster() -> Iterator[SlurmCluster]:
    try:
        running = start_cluster()
    except ClusterUnavailable as exc:
        pytest.skip(f"no single-node SLURM here: {exc}")
    yield running
    running.stop()


@pytest.fixture(scope="module")
def pool(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """The sweep keys of a 24-image pool and a 16-pair downstream set."""
    tmp = tmp_path_factory.mktemp("slurm-pool")
    shards = make_shards(tmp, n=24, size=48, samples_per_shard=8)
    return [f"shards={shards}", f"datasets.tiny.data.root={make_downstream(tmp / 'down')}"]


def cpu_job_env(cluster: SlurmCluster, logs: Path, **extra: str) -> dict[str, str]:
    """config.sh for this node, all through the environment: one CPU rank per job, small memory."""
    settings = {
        "PARTITION": PARTITION,
        "GPUS_PER_NODE": "0",
        "TASKS_PER_NODE": "1",
        "CPUS_PER_TASK": "1",
        "MEM_PER_NODE": "1G",
        "CPUS_REPORT": "1",
        "MEM_REPORT": "500M",
        "LOG_DIR": str(logs),
    }
    return cluster.env(**{**settings, **extra})


def submit_sweep(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(SWEEP_SH), *args], env=env, capture_output=True, text=True, timeout=120)


def test_refused_job_cancels_the_sweep_submitted_so_far(cluster: SlurmCluster, pool: list[str], tmp_path):
    # More memory for the report than the node has: sbatch refuses the last job of the sweep.
    env = cpu_job_env(cluster, tmp_path / "logs", MEM_REPORT=f"{2 * cluster.memory_mb}M")
    # --begin keeps the accepted jobs pending, so nothing starts before it is cancelled.
    out = submit_sweep(env, "--begin=now+1hour", TINY, *pool, f"out={tmp_path / 'run'}")
    assert out.returncode == 1, out.stderr
    assert out.stdout == ""  # no job list: the submission did not happen
    assert "Memory specification can not be satisfied" in out.stderr  # SLURM's own reason
    assert "sbatch refused job dataeff-sweep-report" in out.stderr
    cancelled = re.search(r"cancelling the (\d+) job\(s\) already submitted: ([\d ]+)", out.stderr)
    assert cancelled, out.stderr
    ids = cancelled.group(2).split()
    # The embedding job, then per seed 4 (method, ratio) chains of select/pretrain/finetune and a scratch finetune.
    assert int(cancelled.group(1)) == len(ids) == 1 + 2 * (4 * 3 + 1)
    for job_id in ids:
        assert cluster.job(job_id)["JobState"] == "CANCELLED", job_id
    # The refused job never got an id and the others are cancelled: nothing of the sweep is queued.
    assert cluster.run("squeue", "-h", "-o", "%i") == ""


def finished(job: dict[str, str]) -> bool:
    return job["JobState"] not in ("PENDING", "RUNNING", "COMPLETING", "REQUEUED", "CONFIGURING")


def checkpoint_steps(run: Path) -> list[int]:
    ckpts = (run / "cells" / UNIT / "pretrain" / CHECKPOINT_DIR).glob("step=*.ckpt")
    return sorted(int(m.group(1)) for p in ckpts if (m := CHECKPOINT.fullmatch(p.name)))


def stop_after_checkpoint(cluster: SlurmCluster, job_id: str, run: Path, restarts: int, stop: list[str]) -> int:
    """Once the pretrain job (started ``restarts`` times before) saves a checkpoint past those of earlier
    runs, stop it with the command ``stop`` and let SLURM's requeue start it again at once.

    Returns the newest step saved when the job was stopped: it trained past it.
    """
    before = max(checkpoint_steps(run), default=0)
    cluster.wait_for(
        job_id,
        lambda job: (
            job["JobState"] == "RUNNING"
            and int(job["Restarts"]) == restarts
            and max(checkpoint_steps(run), default=0) > before
        ),
        300,
        f"new checkpoint in run {restarts}",
    )
    cluster.run(*stop)
    cluster.wait_for(
        job_id,
        lambda job: int(job["Restarts"]) == restarts + 1 and job["JobState"] == "PENDING",
        120,
        f"requeue number {restarts + 1}",
    )
    cluster.release_requeued(job_id)
    return max(checkpoint_steps(run))


@pytest.fixture(scope="module")
def preempted(cluster: SlurmCluster, pool: list[str], tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The one-unit sweep on SLURM, its pretrain job stopped twice, and the same sweep run uninterrupted."""
    tmp = tmp_path_factory.mktemp("slurm-sweep")
    keys = [
        *pool,
        "methods=[random]",
        "ratios=[0.5]",
        "seeds=[0]",
        f"pretrain.trainer.max_steps={STEPS}",
        f"pretrain.trainer.checkpoint_every_n_steps={EVERY}",
    ]
    # The uninterrupted reference, side by side with the SLURM jobs.
    reference = subprocess.Popen(
        [sys.executable, "-m", "dataeff", "sweep", "--config", TINY, *keys, f"out={tmp / 'reference'}"],
        cwd=ROOT,
        env=job_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    run = tmp / "slurm"
    logs = tmp / "logs"
    try:
        submitted = submit_sweep(cpu_job_env(cluster, logs), TINY, *keys, f"out={run}")
        assert submitted.returncode == 0, submitted.stderr
        jobs = dict(reversed(line.split()) for line in submitted.stdout.splitlines())
        pretrain = jobs[PRETRAIN_JOB]
        stopped_at = [
            # A time limit near: SLURM's --signal=B:USR1 reaches the batch shell, which requeues the job.
            stop_after_checkpoint(cluster, pretrain, run, 0, ["scancel", "--batch", "--signal=USR1", pretrain]),
            # Pre-emption: the job is requeued from outside while it trains again.
            stop_after_checkpoint(cluster, pretrain, run, 1, ["scontrol", "requeue", pretrain]),
        ]
        ended = {name: cluster.wait_for(i, finished, 300, "end") for name, i in jobs.items()}
        _, reference_err = reference.communicate(timeout=300)
    finally:
        reference.kill()
    assert reference.returncode == 0, reference_err[-3000:]
    return {
        "run": run,
        "reference": tmp / "reference",
        "jobs": ended,
        "stopped_at": stopped_at,
        "pretrain_log": (logs / f"{PRETRAIN_JOB}-{pretrain}.out").read_text(),
        "pretrain_id": pretrain,
    }


# Runs the fixture: seven job starts in a chain, a few minutes on 2 cores, more on a busy machine.
@pytest.mark.timeout(900)
def test_requeued_pretrain_resumes_and_the_sweep_finishes(preempted: dict, cluster: SlurmCluster):
    states = preempted["jobs"]
    assert {name: job["JobState"] for name, job in states.items()} == dict.fromkeys(states, "COMPLETED")
    assert states[PRETRAIN_JOB]["Restarts"] == "2"
    log = preempted["pretrain_log"]
    job_id = preempted["pretrain_id"]
    assert f"time limit near, requeueing job {job_id}" in log
    for restart in (0, 1, 2):
        assert f"dataeff: job {job_id} (restart {restart})" in log, log[-3000:]
    # Both stops came mid-training, and both restarts continued from a checkpoint, not from step 0.
    assert 0 < preempted["stopped_at"][0] < preempted["stopped_at"][1] < STEPS
    assert log.count("pretrain: resuming from ") == 2, log[-3000:]
    # The environment reached sbatch: the report job has the memory MEM_REPORT asked for.
    assert states["dataeff-sweep-report"]["MinMemoryNode"] == "500M"
    assert (preempted["run"] / "report.csv").is_file()


def numbers(table: Path) -> pd.DataFrame:
    df = pd.read_csv(table)
    return df.drop(columns=[c for c in df.columns if c in RUN_SPECIFIC])


@pytest.mark.timeout(900)
def test_preempted_sweep_equals_an_uninterrupted_run(preempted: dict):
    run, reference = preempted["run"], preempted["reference"]
    for encoder in (Path("bootstrap") / ENCODER_WEIGHTS, Path("cells") / UNIT / "pretrain" / ENCODER_WEIGHTS):
        assert (run / encoder).read_bytes() == (reference / encoder).read_bytes(), f"{encoder} differs"
    for table in ("report.csv", "report_seeds.csv"):
        pd.testing.assert_frame_equal(numbers(run / table), numbers(reference / table))
