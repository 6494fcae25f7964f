"""embed + select on 2 real gloo processes give the same manifest as 1 process."""

from pathlib import Path

import pandas as pd

from dataeff.constants import SELECTION_NAME
from dataeff.select.manifest import read_selection
from tests.fixtures import make_shards
from tests.multiproc import run_ranks

REPO = Path(__file__).resolve().parents[2]


#: Run name -> select overrides; "meddel-phash" adds the shard-time signature copy signal.
METHODS = {
    "meddel": [],
    "semdedup": [],
    "meddel-phash": ["method=meddel", "meddel.phash=true"],
    "meddel-near": ["method=meddel", "meddel.near_copies=true"],
    # gather=partitioned: each rank keeps its own embedding rows; the manifest must not change.
    "meddel-part": ["method=meddel", "gather=partitioned"],
    "semdedup-part": ["method=semdedup", "gather=partitioned"],
    "meddel-near-part": ["method=meddel", "meddel.near_copies=true", "gather=partitioned"],
    "meddel-phash-part": ["method=meddel", "meddel.phash=true", "gather=partitioned"],
    "random": [],
    "random-part": ["method=random", "gather=partitioned"],
    # Scan leaves of 2 rows: the within-cluster split must not depend on the world size or the gather.
    "meddel-scan": ["method=meddel", "meddel.max_scan_rows=2"],
    "meddel-scan-part": ["method=meddel", "meddel.max_scan_rows=2", "gather=partitioned"],
}


def _pipeline(rank: int, world: int, shards: str, out: str) -> bool:
    from dataeff.config import load_config
    from dataeff.select import embed, stage

    embed.main(
        load_config(
            embed.EmbedConfig, str(REPO / "configs/embed/tiny.yaml"), [f"data.shards={shards}", f"out={out}/emb"]
        )
    )
    for run, extra in METHODS.items():
        stage.main(
            load_config(
                stage.SelectConfig,
                str(REPO / "configs/select/tiny.yaml"),
                [f"embeddings={out}/emb", f"out={out}/{run}", f"method={run}", "ratio=0.3", *extra],
            )
        )
    return True


def test_two_ranks_match_one_rank(tmp_path):
    # 5 shards of 5: rank 0 embeds 3 shards, rank 1 embeds 2 (uneven on purpose).
    shards = make_shards(tmp_path, n=25, size=48, samples_per_shard=5)
    assert run_ranks(_pipeline, 1, (str(shards), str(tmp_path / "w1"))) == [True]
    assert run_ranks(_pipeline, 2, (str(shards), str(tmp_path / "w2"))) == [True, True]
    assert len(list((tmp_path / "w2" / "emb").glob("rank-*.npz"))) == 2
    for method in METHODS:
        one, s1 = read_selection(tmp_path / "w1" / method)
        two, s2 = read_selection(tmp_path / "w2" / method)
        pd.testing.assert_frame_equal(one, two)  # same kept keys, same reasons, clusters, scores
        assert s1["counts_by_reason"] == s2["counts_by_reason"] and s1["kept"] == s2["kept"] == 8
        assert s1.get("epsilon") == s2.get("epsilon")
    for method in ("meddel", "semdedup", "meddel-near", "meddel-phash", "meddel-scan", "random"):
        gathered = (tmp_path / "w2" / method / SELECTION_NAME).read_bytes()
        for world in ("w1", "w2"):
            assert (tmp_path / world / f"{method}-part" / SELECTION_NAME).read_bytes() == gathered
