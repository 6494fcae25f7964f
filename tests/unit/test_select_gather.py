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


def test_local_rows_subset_renumbers_positions(monkeypatch):
    from dataeff.select import distributed_cluster

    monkeypatch.setattr(distributed_cluster, "EXCHANGE_ROWS", 2)  # compacted over several blocks
    rows = np.arange(10, dtype=np.float16).reshape(5, 2)
    local = LocalRows(rows.copy(), np.array([5, 1, 3, 0, 4]), 6)
    keep = np.array([True, False, True, True, False, True])  # pool rows 0, 2, 3, 5 -> 0, 1, 2, 3
    sub = local.subset(keep)
    assert sub.n == 4 and len(sub) == 4
    np.testing.assert_array_equal(sub.pos, [3, 2, 0])
    np.testing.assert_array_equal(sub.rows, rows[[0, 2, 3]])
    assert np.shares_memory(sub.rows, local.rows)  # compacted in place: no second copy of the share


def _embeddings_dir(tmp_path, files: dict[str, np.ndarray]):
    """A minimal embeddings directory: rank files of keys and rows, and the header naming them."""
    import json

    from dataeff.constants import EMBEDDINGS_HEADER

    for name, rows in files.items():
        keys = np.array([f"{name}-{i:06d}" for i in range(len(rows))])
        with open(tmp_path / name, "wb") as fh:
            np.savez(fh, keys=keys, embeddings=rows)
    dim = next(iter(files.values())).shape[1]
    (tmp_path / EMBEDDINGS_HEADER).write_text(json.dumps({"files": list(files), "dim": dim}))
    return tmp_path


def test_npz_rows_are_read_in_blocks_into_the_given_array(tmp_path, monkeypatch):
    from dataeff.select import embed

    monkeypatch.setattr(embed, "_READ_BYTES", 1000)  # many blocks, the last one short
    x = np.random.default_rng(0).normal(size=(301, 24))
    for dtype in (np.float16, np.float32):  # a float32 file is converted block by block
        np.savez(tmp_path / "e.npz", embeddings=x.astype(dtype))
        out = np.empty((301, 24), np.float16)
        assert embed.read_npz_rows(tmp_path / "e.npz", out) == 301
        assert np.array_equal(out, x.astype(dtype).astype(np.float16))
    with pytest.raises(ValueError, match="shape"):
        embed.read_npz_rows(tmp_path / "e.npz", np.empty((300, 24), np.float16))


def test_partitioned_pool_holds_its_rows_once(tmp_path, monkeypatch):
    """A rank's share is read straight into its array: the peak is the rows, not rows plus a file's copy."""
    import tracemalloc

    from dataeff.select import embed
    from dataeff.select.embed import read_header
    from dataeff.select.pool import local_rows, partition_keys

    monkeypatch.setattr(embed, "_READ_BYTES", 1 << 20)  # blocks small beside the files, as in a real pool
    rows = np.random.default_rng(0).normal(size=(40_000, 384)).astype(np.float16)  # 29 MiB
    emb_dir = _embeddings_dir(tmp_path, {"rank-00000.npz": rows[:30_000], "rank-00001.npz": rows[30_000:]})
    tracemalloc.start()
    try:
        header = read_header(str(emb_dir))
        keys, pos = partition_keys(str(emb_dir), header, 0, 1)
        local = local_rows(str(emb_dir), header, 0, 1, pos, len(keys))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert np.array_equal(local.rows[np.argsort(local.pos)], rows) and keys[0] == "rank-00000.npz-000000"
    assert peak < 1.5 * rows.nbytes, f"peak {peak / rows.nbytes:.2f}x the rows"


def test_a_rank_file_with_fewer_rows_than_keys_is_named(tmp_path):
    from dataeff.select.embed import read_header
    from dataeff.select.pool import local_rows, partition_keys

    emb_dir = _embeddings_dir(tmp_path, {"rank-00000.npz": np.zeros((10, 8), np.float16)})
    keys = np.array([f"k{i}" for i in range(11)])  # one key more than rows, as a cut writer might leave
    with open(emb_dir / "rank-00000.npz", "wb") as fh:
        np.savez(fh, keys=keys, embeddings=np.zeros((10, 8), np.float16))
    header = read_header(str(emb_dir))
    _, pos = partition_keys(str(emb_dir), header, 0, 1)
    with pytest.raises(ConfigError, match="rank-00000.npz is damaged .*10 embedding rows for 11 keys"):
        local_rows(str(emb_dir), header, 0, 1, pos, len(pos))
