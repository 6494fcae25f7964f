"""select.gather: how the embeddings reach the ranks (all, partitioned, auto)."""

import numpy as np
import pytest

from dataeff import dist
from dataeff.config import ConfigError, load_config
from dataeff.select.config import SelectConfig
from dataeff.select.distributed_cluster import LocalRows
from dataeff.select.pool import choose_gather

BASE = ["embeddings=x", "out=x"]


def test_auto_partitions_only_past_the_memory_share():
    assert choose_gather("auto", 1.0, "", 1000, 384) == "all"
    assert choose_gather("auto", 1e-9, "", 1000, 384) == "partitioned"
    assert choose_gather("all", 1e-9, "", 1000, 384) == "all"
    assert choose_gather("partitioned", 1.0, "", 1000, 384) == "partitioned"


def test_auto_gathers_when_the_run_needs_the_whole_matrix():
    cfg = load_config(SelectConfig, None, [*BASE, "report.gallery=true"])
    assert cfg.gather == "auto" and cfg.partition_blocker()
    assert choose_gather(cfg.gather, 1e-9, cfg.partition_blocker(), 1000, 384) == "all"


@pytest.mark.parametrize(
    "overrides, match",
    [
        (["gather=partitioned", "report.gallery=true"], "gather=partitioned: report.gallery"),
        (["gather=some"], "gather"),
        (["gather_memory_fraction=0"], "gather_memory_fraction=0"),
    ],
)
def test_bad_gather_config_names_the_key(overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_config(SelectConfig, None, [*BASE, *overrides])


def test_ranks_per_node_from_the_launcher():
    assert dist.ranks_per_node({"LOCAL_WORLD_SIZE": "4"}) == 4
    assert dist.ranks_per_node({"SLURM_NTASKS_PER_NODE": "8(x2)"}) == 8
    assert dist.ranks_per_node({}) == 1  # one process


def test_all_to_all_on_one_process_returns_its_own_rows():
    a = np.arange(6, dtype=np.float16).reshape(3, 2)
    np.testing.assert_array_equal(dist.all_to_all_rows(a, [3]), a)


def test_local_rows_subset_renumbers_positions():
    rows = np.arange(8, dtype=np.float16).reshape(4, 2)
    local = LocalRows(rows, np.array([5, 1, 3, 0]), 6)
    keep = np.array([True, False, True, True, False, True])  # pool rows 0, 2, 3, 5 -> 0, 1, 2, 3
    sub = local.subset(keep)
    assert sub.n == 4 and len(sub) == 4
    np.testing.assert_array_equal(sub.pos, [3, 2, 0])
    np.testing.assert_array_equal(sub.rows, rows[[0, 2, 3]])
