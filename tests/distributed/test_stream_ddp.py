"""PretrainDataModule on 2 real gloo ranks over deliberately uneven shards.

Every rank must yield the same number of full batches (else DDP hangs in all-reduce),
the ranks' samples must not overlap, every kept sample appears at most once per epoch,
and the samples left out (the remainder under one global batch) are fewer than one
global batch and change between epochs, exactly as the 1-process plan for each rank says.
"""

from __future__ import annotations

from pathlib import Path

from dataeff.config import DataConfig
from dataeff.data.datamodules import PretrainDataModule
from tests.fixtures import write_selection
from tests.multiproc import run_ranks
from tests.unit.test_stream import write_shards


def _cfg(shards: Path, **kw) -> DataConfig:
    return DataConfig(shards=str(shards), image_size=16, batch_size=4, num_workers=2, shuffle_buffer=5, **kw)


def _stream(rank: int, world: int, cfgs: list[DataConfig]) -> list[list[list[str]]]:
    """Two epochs of key batches per config, on this rank (rank/world from dataeff.dist)."""
    from dataeff import dist

    out = []
    for cfg in cfgs:
        dm = PretrainDataModule(cfg, seed=7)
        assert (dm.rank, dm.world_size) == (dist.rank(), dist.world_size()) == (rank, world)
        loader = dm.train_dataloader()
        epochs = [[b["key"] for b in loader] for _ in range(2)]
        # the collective that would hang if one rank had fewer batches than the other
        for batches in epochs:
            counts = dist.all_gather_object(len(batches))
            assert counts == [dm.batches_per_epoch] * world
        out.append(epochs)
    return out


def test_two_ranks_uneven_shards_full_batches_every_sample_at_most_once(tmp_path):
    uneven = write_shards(tmp_path / "uneven", [10, 3, 7])  # 20 samples
    extra = write_shards(tmp_path / "extra", [5], name="extra")  # 25 in all: 3 full global batches of 8, 1 left out
    pool = write_shards(tmp_path / "pool", [9, 2, 6], name="pool")
    pool_keys = [f"pool_{i:04d}" for i in range(17)]
    kept = set(pool_keys[::2])  # 9 kept, unevenly spread over the shards
    sel = write_selection(tmp_path / "sel", pool_keys, kept)
    cfgs = [_cfg(uneven, extra_shards=[str(extra)]), _cfg(pool, selection=str(sel))]
    expected_sets = [
        {f"set_{i:04d}" for i in range(20)} | {f"extra_{i:04d}" for i in range(5)},
        kept,
    ]

    results = run_ranks(_stream, world=2, args=(cfgs,))

    global_batch = 4 * 2
    for c, (cfg, expected) in enumerate(zip(cfgs, expected_sets, strict=False)):
        per_rank = len(expected) // global_batch * 4
        left_out = []
        for epoch in range(2):
            ranks = [[k for batch in results[r][c][epoch] for k in batch] for r in range(2)]
            assert [len(results[r][c][epoch]) for r in range(2)] == [per_rank // 4] * 2
            assert all(len(batch) == 4 for r in range(2) for batch in results[r][c][epoch]), "a partial batch"
            assert [len(keys) for keys in ranks] == [per_rank] * 2
            own = [set(keys) for keys in ranks]
            assert [len(o) for o in own] == [per_rank] * 2, "a sample repeated within a rank"
            assert not own[0] & own[1], "ranks overlap"
            assert own[0] | own[1] <= expected
            left_out.append(expected - own[0] - own[1])
            assert len(left_out[-1]) == len(expected) % global_batch < global_batch
            # each rank streams exactly what the single-process plan for that rank says
            for r in range(2):
                solo = PretrainDataModule(cfg, seed=7, rank=r, world_size=2).train_dataloader()
                for _ in range(epoch):
                    list(solo)
                assert [b["key"] for b in solo] == results[r][c][epoch]
        assert left_out[0] != left_out[1], "the same remainder was left out twice"
    assert results[0][0][0] != results[0][0][1]  # epochs are reshuffled
