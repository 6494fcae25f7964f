"""SLURM launch scripts: lint, what they pass to sbatch, requeue, and a real 2-rank select.

SLURM itself is not needed: small stand-ins for ``sbatch``, ``srun``, ``scontrol`` and
``scancel`` are put first on PATH. The fake ``srun`` starts ``SLURM_NTASKS`` local copies of
its command with the per-task variables real srun sets (``SLURM_PROCID``, ``SLURM_LOCALID``,
...), so the ranks find each other only through ``dataeff/dist.py`` reading SLURM's
environment. The same scripts on a real single-node SLURM: test_slurm_real.py.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from tests.slurm_cluster import job_env

ROOT = Path(__file__).resolve().parents[2]
SLURM = ROOT / "launch" / "slurm"
STAGES = ("embed", "select", "pretrain", "finetune", "sweep", "report")
SCRIPTS = sorted(
    [*SLURM.glob("*.sbatch"), *SLURM.glob("*.sh"), ROOT / "launch" / "torchrun.sh"],
    key=lambda p: p.name,
)

FAKE_SBATCH = """#!/usr/bin/env bash
# Record one submission (one argument a line, blank line between jobs) and print a job id.
n=$(( $(cat "$FAKE_DIR/next_id" 2>/dev/null || echo 100) + 1 ))
echo "$n" > "$FAKE_DIR/next_id"
{ printf '%s\\n' "$@"; echo; } >> "$FAKE_DIR/sbatch.log"
echo "$n"
"""

# The same on a cluster whose nodes have less than 8 GB: such a job is refused as SLURM does.
FAKE_SBATCH_SMALL_NODE = FAKE_SBATCH.replace(
    "\nn=",
    """
for arg in "$@"; do
  if [[ "$arg" == --mem=8G ]]; then
    echo "sbatch: error: Memory specification can not be satisfied" >&2
    echo "sbatch: error: Batch job submission failed: Requested node configuration is not available" >&2
    exit 1
  fi
done
n=""",
    1,
)

FAKE_SCANCEL = """#!/usr/bin/env bash
echo "$*" >> "$FAKE_DIR/scancel.log"
"""

FAKE_SRUN = """#!/usr/bin/env bash
# Start SLURM_NTASKS local copies of the command, as srun does on one node.
echo $$ > "$FAKE_DIR/srun.pid"
while [[ "$1" == -* ]]; do echo "$1" >> "$FAKE_DIR/srun.options"; shift; done
pids=()
for ((i = 0; i < SLURM_NTASKS; i++)); do
  SLURM_PROCID=$i SLURM_LOCALID=$i SLURM_NODEID=0 SLURM_STEP_NODELIST="$SLURM_JOB_NODELIST" \\
    SLURM_STEP_NUM_TASKS="$SLURM_NTASKS" "$@" &
  pids+=($!)
done
rc=0
for pid in "${pids[@]}"; do wait "$pid" || rc=$?; done
exit "$rc"
"""

FAKE_SRUN_SLEEP = """#!/usr/bin/env bash
# A job step that runs until SLURM stops it.
echo $$ > "$FAKE_DIR/srun.pid"
sleep 60 &
child=$!
trap 'echo SIGTERM >> "$FAKE_DIR/step.log"; kill "$child"; exit 143' TERM
wait
"""

FAKE_SCONTROL = """#!/usr/bin/env bash
# Record the call; 'requeue' stops the running step with SIGTERM, as SLURM does.
echo "$*" >> "$FAKE_DIR/scontrol.log"
[[ "$1" == requeue ]] && kill -TERM "$(cat "$FAKE_DIR/srun.pid")"
exit 0
"""


def _fake_bin(tmp_path: Path, **scripts: str) -> Path:
    bin_dir = tmp_path / "fake-bin"
    bin_dir.mkdir(exist_ok=True)
    for name, text in scripts.items():
        path = bin_dir / name
        path.write_text(text)
        path.chmod(0o755)
    return bin_dir


def _clean_env(tmp_path: Path, bin_dir: Path, **extra: str) -> dict[str, str]:
    """The environment of a batch job on a machine with no launcher variables of its own."""
    return job_env(PATH=f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}", FAKE_DIR=str(tmp_path), **extra)


def _read_submissions(tmp_path: Path) -> list[list[str]]:
    blocks = (tmp_path / "sbatch.log").read_text().split("\n\n")
    return [b.splitlines() for b in blocks if b.strip()]


# --------------------------------------------------------------------------- lint


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_scripts_parse(script):
    result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


@pytest.mark.skipif(
    shutil.which("shellcheck") is None,
    reason="shellcheck is not installed (make venv installs it with apt when run as root)",
)
def test_shellcheck_clean():
    # -x follows the 'source' lines; paths in them are relative to the repository root.
    result = subprocess.run(
        ["shellcheck", "-x", *[str(p.relative_to(ROOT)) for p in SCRIPTS]],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_stage_has_an_sbatch_script_with_requeue_and_signal():
    for stage in STAGES:
        text = (SLURM / f"{stage}.sbatch").read_text()
        assert f"#SBATCH --job-name=dataeff-{stage}" in text
        assert "#SBATCH --requeue" in text
        assert "#SBATCH --signal=B:USR1@" in text
        assert f"run_stage {stage} " in text


# --------------------------------------------------------------------------- submission


def test_submit_passes_config_sh_settings_to_sbatch(tmp_path):
    bin_dir = _fake_bin(tmp_path, sbatch=FAKE_SBATCH)
    env = _clean_env(tmp_path, bin_dir, NODES="3", GPUS_PER_NODE="8", PARTITION="big", LOG_DIR=str(tmp_path / "logs"))
    out = subprocess.run(
        [str(SLURM / "submit.sh"), "--dependency=afterok:7", "pretrain", "configs/pretrain/tiny.yaml", "seed=3"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.strip() == "101"
    (args,) = _read_submissions(tmp_path)
    assert args[0] == "--parsable" and args[1] == f"--chdir={ROOT}"
    for expected in ("--partition=big", "--nodes=3", "--ntasks-per-node=8", "--gpus-per-node=8", "--time=24:00:00"):
        assert expected in args, (expected, args)
    assert f"--output={tmp_path / 'logs'}/%x-%j.out" in args
    # The caller's sbatch options come after config.sh's (sbatch: the last one wins),
    # then the script and the stage arguments, untouched.
    assert args.index("--dependency=afterok:7") > args.index("--partition=big")
    assert args[-3:] == ["launch/slurm/pretrain.sbatch", "configs/pretrain/tiny.yaml", "seed=3"]
    assert (tmp_path / "logs").is_dir()  # sbatch does not create the log directory itself


def test_submit_report_is_one_cpu_task_and_unknown_stage_fails(tmp_path):
    bin_dir = _fake_bin(tmp_path, sbatch=FAKE_SBATCH)
    env = _clean_env(tmp_path, bin_dir, LOG_DIR=str(tmp_path / "logs"))
    subprocess.run([str(SLURM / "submit.sh"), "report", "runs/x"], env=env, capture_output=True, check=True)
    (args,) = _read_submissions(tmp_path)
    # The per-stage options follow the shared GPU ones, so they win in sbatch.
    assert "--ntasks=1" in args and not any(a.startswith("--gpus-per-node") for a in args)
    bad = subprocess.run([str(SLURM / "submit.sh"), "nosuchstage"], env=env, capture_output=True, text=True)
    assert bad.returncode == 2 and "stages:" in bad.stderr


def test_sweep_submits_a_job_chain_per_cell_and_seed_then_report(tmp_path):
    bin_dir = _fake_bin(tmp_path, sbatch=FAKE_SBATCH)
    env = _clean_env(
        tmp_path, bin_dir, LOG_DIR=str(tmp_path / "logs"), TIME_SELECT="01:00:00", TIME_FINETUNE="03:00:00"
    )
    overrides = [
        "shards=shards/pool",
        "datasets.tiny.data.root=data/kvasir-seg",
        "methods=[full,random,meddel,scratch]",
        "ratios=[0.5,1.0]",
        "seeds=[0,1]",
        "out=runs/s1",
    ]
    out = subprocess.run(
        [str(SLURM / "sweep.sh"), "--qos=low", "configs/sweep/tiny.yaml", *overrides],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    jobs = _read_submissions(tmp_path)
    ids = {
        next(a for a in job if a.startswith("--job-name=")).split("=", 1)[1]: str(101 + i) for i, job in enumerate(jobs)
    }
    by_name = dict(zip(ids, jobs, strict=False))
    # The sweep's planner: full only at 1.0; random at 1.0 is full again, so left out; every
    # cell once per seed, seed-major; scratch has a finetune job only.
    cells = ["full-r1", "random-r0.5", "meddel-r0.5", "meddel-r1"]
    stages = ("select", "pretrain", "finetune")
    expected = ["dataeff-sweep-embed"]
    for seed in (0, 1):
        expected += [f"dataeff-sweep-{c}-s{seed}-{s}" for c in cells for s in stages]
        expected.append(f"dataeff-sweep-scratch-s{seed}-finetune")
    assert list(ids) == [*expected, "dataeff-sweep-report"]
    embed = by_name["dataeff-sweep-embed"]
    assert not any(a.startswith("--dependency") for a in embed)
    assert embed[-2:] == ["stages=[embed]", "report=false"] and "--time=24:00:00" in embed  # bootstrap = pretraining
    for seed in (0, 1):
        for cell in cells:
            method, ratio = cell.split("-r")
            after = "dataeff-sweep-embed"
            for stage in stages:
                job = by_name[f"dataeff-sweep-{cell}-s{seed}-{stage}"]
                assert f"--dependency=afterok:{ids[after]}" in job
                args = job[job.index("launch/slurm/sweep.sbatch") + 1 :]
                assert args == [
                    "configs/sweep/tiny.yaml",
                    *overrides,
                    f"methods=[{method}]",
                    f"ratios=[{float(ratio)!r}]",
                    f"seeds=[{seed}]",
                    f"stages=[{stage}]",
                    "report=false",
                ]
                after = f"dataeff-sweep-{cell}-s{seed}-{stage}"
        # A random encoder needs no pool embedding: the scratch job waits for nothing.
        scratch = by_name[f"dataeff-sweep-scratch-s{seed}-finetune"]
        assert not any(a.startswith("--dependency") for a in scratch)
        assert scratch[-4:] == ["methods=[scratch]", f"seeds=[{seed}]", "stages=[finetune]", "report=false"]
    # Each stage gets its own resources and time limit from config.sh.
    assert "--time=01:00:00" in by_name["dataeff-sweep-meddel-r1-s1-select"]
    assert "--time=03:00:00" in by_name["dataeff-sweep-meddel-r1-s1-finetune"]
    assert "--nodes=1" in by_name["dataeff-sweep-meddel-r1-s0-finetune"]
    report = by_name["dataeff-sweep-report"]
    finetunes = ":".join(ids[n] for n in ids if n.endswith("-finetune"))
    assert f"--dependency=afterany:{finetunes}" in report
    assert "launch/slurm/report.sbatch" in report and "run=runs/s1" in report
    assert all("--qos=low" in job for job in jobs)
    assert out.stdout.split() == [x for name, i in ids.items() for x in (i, name)]


def test_sweep_names_the_replacement_of_an_old_seed_key(tmp_path):
    bin_dir = _fake_bin(tmp_path, sbatch=FAKE_SBATCH)
    env = _clean_env(tmp_path, bin_dir, LOG_DIR=str(tmp_path / "logs"))
    out = subprocess.run(
        [str(SLURM / "sweep.sh"), "configs/sweep/tiny.yaml", "shards=x", "datasets.t.data.root=y", "seed=3"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode != 0 and "'seed' was replaced by seeds" in out.stderr
    assert not (tmp_path / "sbatch.log").exists()


def test_sweep_submission_is_all_or_nothing(tmp_path):
    """One refused job (the report's 8 GB on small nodes) cancels every job submitted before it.

    MEM_REPORT lowers that memory (test_every_setting_of_config_sh_comes_from_the_environment).
    """
    bin_dir = _fake_bin(tmp_path, sbatch=FAKE_SBATCH_SMALL_NODE, scancel=FAKE_SCANCEL)
    env = _clean_env(tmp_path, bin_dir, LOG_DIR=str(tmp_path / "logs"))
    sweep = [str(SLURM / "sweep.sh"), "configs/sweep/tiny.yaml", "shards=x", "datasets.t.data.root=y"]
    out = subprocess.run(sweep, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 1 and out.stdout == ""
    assert "Memory specification can not be satisfied" in out.stderr
    assert "sbatch refused job dataeff-sweep-report" in out.stderr and "MEM_REPORT" not in out.stderr
    submitted = [str(101 + i) for i in range(len(_read_submissions(tmp_path)))]
    assert len(submitted) == 1 + 2 * (4 * 3 + 1)  # all but the report: embed, 2 seeds x (4 chains + scratch)
    assert (tmp_path / "scancel.log").read_text().split() == submitted
    assert f"cancelling the {len(submitted)} job(s) already submitted: {' '.join(submitted)}" in out.stderr


CONFIG_SH = (SLURM / "config.sh").read_text()
# Settings the jobs read when they run, not sbatch options.
JOB_SETTINGS = {"PYTHON", "DATAEFF_DIST_TIMEOUT", "WANDB_MODE"}
# What is not a resource but a fact of the stage: 'dataeff report' is one process.
FIXED = {"report": ["--nodes=1", "--ntasks=1"]}


def test_every_setting_of_config_sh_comes_from_the_environment(tmp_path):
    assignments = re.findall(r"^(?:export )?([A-Z_]+)=(.*)$", CONFIG_SH, flags=re.M)
    scalars = [(name, value) for name, value in assignments if not value.startswith("(")]
    assert {name for name, value in scalars if not value.startswith(f'"${{{name}:-')} == set()
    # Every sbatch option of config.sh takes its value from one of the settings: set each to a
    # value of its own and find it in what each stage passes to sbatch.
    settings = {name: f"{name.lower()}-from-env" for name, _ in scalars if name not in JOB_SETTINGS}
    bin_dir = _fake_bin(tmp_path, sbatch=FAKE_SBATCH)
    env = _clean_env(tmp_path, bin_dir, **settings)
    for stage in STAGES:
        subprocess.run([str(SLURM / "submit.sh"), stage], env=env, capture_output=True, check=True)
    seen = set()
    for stage, args in zip(STAGES, _read_submissions(tmp_path), strict=True):
        options = args[2 : args.index(f"launch/slurm/{stage}.sbatch")]  # after --parsable --chdir
        for option in options:
            if option in FIXED.get(stage, []):
                continue
            used = {name for name, value in settings.items() if value in option}
            assert used, f"{stage}: {option} is fixed in config.sh; make it a setting"
            seen |= used
    assert seen == set(settings)


# --------------------------------------------------------------------------- requeue


def test_usr1_before_time_limit_requeues_the_job(tmp_path):
    """SLURM's --signal=B:USR1 reaches the batch shell, which requeues; the step gets SIGTERM."""
    bin_dir = _fake_bin(tmp_path, srun=FAKE_SRUN_SLEEP, scontrol=FAKE_SCONTROL)
    env = _clean_env(tmp_path, bin_dir, SLURM_JOB_ID="4711", SLURM_NTASKS="2", SLURM_JOB_NODELIST="localhost")
    job = subprocess.Popen(
        ["bash", str(SLURM / "pretrain.sbatch"), "configs/pretrain/tiny.yaml"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 20
        while not (tmp_path / "srun.pid").exists():
            assert time.monotonic() < deadline, "the batch script never started its step"
            time.sleep(0.05)
        time.sleep(0.2)  # let bash reach 'wait'
        job.send_signal(signal.SIGUSR1)
        _, err = job.communicate(timeout=20)
    finally:
        job.kill()
    assert (tmp_path / "scontrol.log").read_text().split() == ["requeue", "4711"]
    assert (tmp_path / "step.log").read_text().strip() == "SIGTERM"
    assert "requeueing job 4711" in err


# --------------------------------------------------------------------------- a real 2-rank job


def _port_from_job_id() -> tuple[int, int]:
    """A SLURM job id whose derived master port (29500 + id % 10000, dist.py) is free."""
    for _ in range(200):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if 29500 <= port < 39500:
            return port - 29500, port
    for port in range(31000, 39500, 7):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port - 29500, port
    raise RuntimeError("no free port in 29500-39499")


@pytest.fixture(scope="module")
def embedded(tmp_path_factory) -> dict[str, Path]:
    from tests.fixtures import make_embedded_pool

    return make_embedded_pool(tmp_path_factory.mktemp("slurm"))


def test_select_sbatch_runs_two_ranks_in_one_group(embedded, tmp_path):
    """select.sbatch under a fake srun: 2 ranks meet through SLURM's variables and finish."""
    from dataeff.cli import main as cli_main
    from dataeff.select.manifest import read_selection

    job_id, _ = _port_from_job_id()
    bin_dir = _fake_bin(tmp_path, srun=FAKE_SRUN)
    env = _clean_env(
        tmp_path,
        bin_dir,
        SLURM_JOB_ID=str(job_id),
        SLURM_NTASKS="2",
        SLURM_NNODES="1",
        SLURM_JOB_NODELIST="localhost",
        SLURM_CPUS_PER_TASK="1",
        DATAEFF_DIST_TIMEOUT="120",
    )
    args = [f"embeddings={embedded['embeddings']}", f"data.shards={embedded['shards']}"]
    job = subprocess.run(
        ["bash", str(SLURM / "select.sbatch"), "configs/select/tiny.yaml", *args, f"out={tmp_path / 'two'}"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert job.returncode == 0, job.stderr[-4000:]
    assert "--kill-on-bad-exit=1" in (tmp_path / "srun.options").read_text().split()
    # Rank 0 alone logs INFO: one 'kept' line means the two tasks were ranks 0 and 1 of
    # one group, not two single-process runs racing on the same output.
    assert job.stderr.count("meddel: kept ") == 1, job.stderr[-4000:]
    assert cli_main(["select", "--config", "configs/select/tiny.yaml", *args, f"out={tmp_path / 'one'}"]) == 0
    frame2, summary2 = read_selection(tmp_path / "two")
    frame1, summary1 = read_selection(tmp_path / "one")
    assert frame1.equals(frame2)
    assert summary1["kept"] == summary2["kept"] > 0
