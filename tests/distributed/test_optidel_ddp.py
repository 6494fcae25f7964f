"""OptiDEL on 2 gloo ranks equals OptiDEL on 1 process: same patches, selection and mosaic bytes."""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd
import pytest
import torch

from tests.integration.test_optidel import build_inputs, run_select
from tests.multiproc import run_ranks

EXTRA = ("optidel.mosaics_per_shard=1",)  # one mosaic per tar, so both ranks compose


def _select_on_rank(rank: int, world: int, inputs: dict, out: str, extra: tuple[str, ...]) -> str:
    os.environ.setdefault("WANDB_MODE", "offline")
    torch.set_num_threads(1)  # same kernels as the 1-process run
    run_select(inputs, Path(out), *extra)
    return out


def _tars(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.glob("*.tar"))}


@pytest.mark.timeout(600)
@pytest.mark.parametrize("hardness", ["mae_loss", "prototype_distance"])
def test_two_ranks_match_one_process(tmp_path, hardness):
    torch.set_num_threads(1)
    inputs = build_inputs(tmp_path)
    # mae_loss averages the default K = 4 masks; prototype_distance clusters the gathered patch embeddings.
    extra = (*EXTRA, f"optidel.hardness={hardness}")
    one = run_select(inputs, tmp_path / "one" / "run", *extra)
    two = tmp_path / "two" / "run"  # same run name -> same mosaic keys
    run_ranks(_select_on_rank, world=2, args=(inputs, str(two), extra))

    # Per-shard SAM work was split: both ranks wrote their own shards' results.
    assert sorted(p.name for p in (one / "sam").glob("*.npz")) == sorted(p.name for p in (two / "sam").glob("*.npz"))
    p1, p2 = pd.read_parquet(one / "patches.parquet"), pd.read_parquet(two / "patches.parquet")
    pd.testing.assert_frame_equal(p1, p2)
    assert p1["selected"].sum() > 0
    pd.testing.assert_frame_equal(
        pd.read_parquet(one / "selection.parquet"), pd.read_parquet(two / "selection.parquet")
    )
    # Mosaic shards are byte-identical, and there are several (written by different ranks).
    t1, t2 = _tars(one / "generated"), _tars(two / "generated")
    assert len(t1) >= 2 and t1 == t2
    pd.testing.assert_frame_equal(
        pd.read_parquet(one / "generated" / "index.parquet"), pd.read_parquet(two / "generated" / "index.parquet")
    )
