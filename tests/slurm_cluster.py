"""A real single-node SLURM cluster on this machine, for tests: munged, slurmctld and slurmd.

Debian's packages (``slurmctld``, ``slurmd``, ``munge``, ``slurm-client``; ``make venv``
installs them when run as root) are started on localhost with their own ``slurm.conf``,
munge key, ports and state directories under a fresh temporary directory, so they touch
no system-wide SLURM or munge setup. No cgroups are needed (``proctrack/linuxproc``,
``task/none``); the node has the CPUs and memory ``slurmd -C`` finds on this machine.

Usage::

    cluster = start_cluster()          # raises ClusterUnavailable(reason) if it cannot start
    try:
        subprocess.run(["sbatch", ...], env=cluster.env(PYTHON=...))
        cluster.wait_for(job_id, lambda job: job["JobState"] == "COMPLETED", 300, "job done")
    finally:
        cluster.stop()
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "scontrol", "scancel", "squeue", "sinfo", "srun")
NODE = "localhost"  # the node's name is also the address every rank resolves (dist.py)
PARTITION = "dataeff"
# Variables a launcher (or an outer SLURM job) sets: a job must see only its own.
LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")

SLURM_CONF = """\
ClusterName=dataefftest
SlurmctldHost={node}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser={user}
SlurmdUser={user}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={root}/munge/socket
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd.log
# No cgroups: processes tracked by their parent pid, no task binding, no accounting.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU_Memory
ReturnToService=2
JobRequeue=1
# Seconds between a job's SIGTERM and SIGKILL: time for a checkpoint.
KillWait=30
NodeName={node} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={memory_mb} State=UNKNOWN
PartitionName={partition} Nodes={node} Default=YES MaxTime=INFINITE State=UP
"""


class ClusterUnavailable(RuntimeError):
    """SLURM cannot run here; the message says why (missing binaries, a daemon that did not start)."""


def _find(name: str) -> str | None:
    """``name`` on PATH or in the sbin directories, where Debian puts the daemons."""
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin:/usr/local/sbin")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return f"(no {path.name})"


def job_env(**extra: str) -> dict[str, str]:
    """This process's environment without launcher variables, plus what a job needs to run dataeff."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("SLURM_", "SBATCH_", "SRUN_", "PET_")) and k not in LAUNCHER_VARS
    }
    env.update(PYTHON=sys.executable, WANDB_MODE="offline", WANDB_SILENT="true", OMP_NUM_THREADS="1")
    env.update(extra)
    return env


@dataclass
class SlurmCluster:
    """A running single-node cluster; :meth:`env` is the environment its clients need."""

    root: Path
    cpus: int
    memory_mb: int
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)

    @property
    def conf(self) -> Path:
        return self.root / "slurm.conf"

    def env(self, **extra: str) -> dict[str, str]:
        """A job's environment (:func:`job_env`) pointed at this cluster's ``slurm.conf``."""
        return job_env(SLURM_CONF=str(self.conf), **extra)

    def run(self, *args: str) -> str:
        """Run a SLURM client command against this cluster; its stdout."""
        return subprocess.run(args, env=self.env(), capture_output=True, text=True, check=True, timeout=60).stdout

    def job(self, job_id: str) -> dict[str, str]:
        """``scontrol show job`` as a dict (``JobState``, ``Restarts``, ``Reason``, ...)."""
        out = self.run("scontrol", "show", "job", "--oneliner", job_id)
        return dict(item.split("=", 1) for item in out.split() if "=" in item)

    def wait_for(
        self, job_id: str, condition: Callable[[dict[str, str]], bool], timeout: float, what: str
    ) -> dict[str, str]:
        """Poll job ``job_id`` until ``condition(job)`` holds; its last record. Fails naming ``what``."""
        deadline = time.monotonic() + timeout
        while True:
            job = self.job(job_id)
            if condition(job):
                return job
            if time.monotonic() > deadline:
                raise AssertionError(f"job {job_id}: no {what} within {timeout:.0f} s; last state {job}")
            time.sleep(0.2)

    def release_requeued(self, job_id: str) -> None:
        """Let a requeued job run now: SLURM holds one back for about two minutes (BeginTime)."""
        self.run("scontrol", "update", f"JobId={job_id}", "StartTime=now")

    def logs(self, daemon: str = "") -> str:
        """The tails of the logs of ``daemon`` (all daemons when empty), for a failure message."""
        return "\n".join(f"== {p.name}\n{_tail(p)}" for p in sorted((self.root / "log").glob(f"{daemon}*")))

    def stop(self) -> None:
        """Cancel every job, wait for the node to empty, stop the daemons, remove the directory."""
        if "slurmctld" in self.processes and self.processes["slurmctld"].poll() is None:
            subprocess.run(["scancel", f"--partition={PARTITION}"], env=self.env(), capture_output=True, timeout=60)
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                queue = subprocess.run(["squeue", "-h"], env=self.env(), capture_output=True, text=True, timeout=60)
                if queue.returncode != 0 or not queue.stdout.strip():
                    break
                time.sleep(0.5)
        for name in reversed(DAEMONS):
            proc = self.processes.pop(name, None)
            if proc is None or proc.poll() is not None:
                continue
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        shutil.rmtree(self.root, ignore_errors=True)

    def _start(self, name: str, args: list[str], ready: Callable[[], bool], timeout: float = 30) -> None:
        log = self.root / "log" / f"{name}.out"
        with log.open("wb") as out:
            proc = subprocess.Popen(args, env=self.env(), stdout=out, stderr=subprocess.STDOUT)
        self.processes[name] = proc
        deadline = time.monotonic() + timeout
        while not ready():
            if proc.poll() is not None or time.monotonic() > deadline:
                state = f"exited with {proc.returncode}" if proc.poll() is not None else f"not ready in {timeout} s"
                raise ClusterUnavailable(f"{name} did not start ({state}):\n{self.logs(name)}")
            time.sleep(0.2)

    def _answers(self, *args: str, expect: str) -> bool:
        result = subprocess.run(args, env=self.env(), capture_output=True, text=True, timeout=30)
        return result.returncode == 0 and expect in result.stdout


def _node_resources(slurmd: str) -> tuple[int, int]:
    """CPUs and memory (MB) of this machine as slurmd counts them (``slurmd -C``)."""
    out = subprocess.run([slurmd, "-C"], capture_output=True, text=True, timeout=30)
    fields = dict(item.split("=", 1) for item in out.stdout.split() if "=" in item)
    if out.returncode != 0 or "CPUs" not in fields or "RealMemory" not in fields:
        raise ClusterUnavailable(f"'slurmd -C' did not report the node's resources: {out.stdout}{out.stderr}")
    return int(fields["CPUs"]), int(fields["RealMemory"])


def start_cluster() -> SlurmCluster:
    """Configure and start munged, slurmctld and slurmd on localhost; raises ClusterUnavailable."""
    paths = {name: _find(name) for name in (*DAEMONS, *CLIENTS)}
    missing = [name for name, path in paths.items() if path is None]
    if missing:
        raise ClusterUnavailable(
            f"SLURM is not installed: no {', '.join(missing)} (Debian: apt-get install slurmctld slurmd munge "
            "slurm-client; 'make venv' does it when run as root)"
        )
    cpus, memory_mb = _node_resources(str(paths["slurmd"]))
    # munged wants its socket directory open to all (0755) and its key private: a directory of
    # our own under the system temp dir, not pytest's (0700) tree.
    root = Path(tempfile.mkdtemp(prefix="dataeff-slurm-"))
    root.chmod(0o755)
    cluster = SlurmCluster(root=root, cpus=cpus, memory_mb=memory_mb)
    try:
        for sub in ("munge", "state", "spool", "log"):
            (root / sub).mkdir(mode=0o755)
        key = os.open(root / "munge" / "key", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o400)
        os.write(key, os.urandom(1024))
        os.close(key)
        cluster.conf.write_text(
            SLURM_CONF.format(
                node=NODE,
                partition=PARTITION,
                root=root,
                user=pwd.getpwuid(os.geteuid()).pw_name,
                ctld_port=_free_port(),
                slurmd_port=_free_port(),
                cpus=cpus,
                memory_mb=memory_mb,
            )
        )
        munge = root / "munge"
        cluster._start(
            "munged",
            [str(paths["munged"]), "--foreground", f"--socket={munge}/socket", f"--key-file={munge}/key"]
            + [f"--log-file={munge}/log", f"--pid-file={munge}/pid", f"--seed-file={munge}/seed"],
            ready=lambda: (munge / "socket").exists(),
        )
        cluster._start(
            "slurmctld",
            [str(paths["slurmctld"]), "-D", "-i"],
            ready=lambda: cluster._answers("scontrol", "ping", expect="is UP"),
        )
        cluster._start(
            "slurmd",
            [str(paths["slurmd"]), "-D", "-N", NODE],
            ready=lambda: cluster._answers("sinfo", "-h", "-N", "-o", "%T", expect="idle"),
        )
    except BaseException:
        cluster.stop()
        raise
    return cluster
