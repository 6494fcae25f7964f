"""Rank layout from torchrun and SLURM environments; single-process defaults."""

import numpy as np

from dataeff import dist


def test_single_process_defaults():
    assert dist.env_from({}) == dist.DistEnv()
    assert (dist.rank(), dist.world_size(), dist.is_main()) == (0, 1, True)
    a = np.arange(6, dtype=np.float16).reshape(3, 2)
    assert np.array_equal(dist.all_gather_concat(a), a)
    assert dist.all_gather_object({"x": 1}) == [{"x": 1}]
    assert dist.broadcast_object(7) == 7


def test_torchrun_env():
    env = dist.env_from({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "n1", "MASTER_PORT": "1234"})
    assert env == dist.DistEnv(3, 8, 1, "n1", 1234, "torchrun")


def test_slurm_env_takes_first_node_and_job_port():
    env = dist.env_from(
        {
            "SLURM_PROCID": "5",
            "SLURM_NTASKS": "8",
            "SLURM_LOCALID": "1",
            "SLURM_NODELIST": "gpu[07-08,10]",
            "SLURM_JOB_ID": "123456",
        }
    )
    assert (env.rank, env.world_size, env.local_rank, env.master_addr) == (5, 8, 1, "gpu07")
    assert env.master_port == 29500 + 123456 % 10000
    assert env.launcher == "slurm"


def test_torchrun_wins_over_slurm():
    env = dist.env_from({"RANK": "0", "WORLD_SIZE": "2", "SLURM_PROCID": "1", "SLURM_NTASKS": "2"})
    assert env.launcher == "torchrun"


def test_single_task_slurm_is_single_process():
    assert dist.env_from({"SLURM_PROCID": "0", "SLURM_NTASKS": "1"}).world_size == 1


def test_expand_nodelist():
    assert dist.expand_nodelist("a[01-03,07],b5,c[9]") == ["a01", "a02", "a03", "a07", "b5", "c9"]
    assert dist.expand_nodelist("node1") == ["node1"]
