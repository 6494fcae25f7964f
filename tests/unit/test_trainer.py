"""The pure parts of the Lightning shell: layout resolution per launcher, resume-checkpoint choice."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import torch

from dataeff.config import ConfigError, TrainerConfig
from dataeff.trainer import find_resume_checkpoint, resolve_layout


def test_layout_cpu_single_and_ddp():
    one = resolve_layout(TrainerConfig(), {}, cuda_devices=0)
    assert (one["strategy"], one["precision"], one["devices"], one["world_size"]) == ("auto", "32-true", 1, 1)
    two = resolve_layout(TrainerConfig(), {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"}, cuda_devices=0)
    assert (two["strategy"], two["devices"], two["num_nodes"]) == ("ddp", 2, 1)


def test_layout_gpu_torchrun_and_slurm_multinode():
    torchrun = {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4"}
    lay = resolve_layout(TrainerConfig(), torchrun, cuda_devices=4)
    assert (lay["strategy"], lay["precision"], lay["devices"], lay["num_nodes"]) == (
        "deepspeed_stage_2",
        "bf16-mixed",
        4,
        2,
    )
    slurm = {"SLURM_PROCID": "3", "SLURM_NTASKS": "8", "SLURM_NNODES": "2", "SLURM_NODELIST": "gpu[01-02]"}
    assert resolve_layout(TrainerConfig(), slurm, cuda_devices=4)["num_nodes"] == 2
    single = resolve_layout(TrainerConfig(), {}, cuda_devices=2)
    assert (single["devices"], single["strategy"]) == (2, "deepspeed_stage_2")


def test_layout_errors():
    with pytest.raises(ConfigError, match="DeepSpeed needs CUDA"):
        resolve_layout(TrainerConfig(strategy="deepspeed_stage_2"), {}, cuda_devices=0)
    with pytest.raises(ConfigError, match="no CUDA device"):
        resolve_layout(TrainerConfig(accelerator="gpu"), {}, cuda_devices=0)
    with pytest.raises(ConfigError, match="launcher started 4"):
        resolve_layout(TrainerConfig(devices="3"), {"RANK": "0", "WORLD_SIZE": "4"}, cuda_devices=0)


def _touch(path: Path, age_s: float) -> Path:
    """A small real checkpoint (it must load to be chosen), modified ``age_s`` seconds ago."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"global_step": 1}, path)
    stamp = time.time() - age_s
    os.utime(path, (stamp, stamp))
    return path


def test_resume_checkpoint_is_the_newest_and_never_a_temp_file(tmp_path):
    assert find_resume_checkpoint(tmp_path) is None
    ckpts = tmp_path / "checkpoints"
    _touch(ckpts / "step=00000003.ckpt", 30)
    newest = _touch(ckpts / "step=00000006.ckpt", 20)
    # Newer, but still being written: files.write_atomic temp names and Lightning-era .tmp.ckpt.
    _touch(ckpts / ".step=00000009.ckpt.123-abcd.tmp.ckpt", 0)
    _touch(ckpts / "step=00000009.tmp.ckpt", 0)
    _touch(ckpts / ".step=00000009.ckpt.123-abcd.tmp", 0)
    (ckpts / "last.ckpt").symlink_to("step=00000099.ckpt")  # dangling link
    assert find_resume_checkpoint(tmp_path) == newest
    hpc = _touch(tmp_path / "hpc_ckpt_7.ckpt", 10)
    assert find_resume_checkpoint(tmp_path) == hpc
