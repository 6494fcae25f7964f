"""``embed`` decodes in DataLoader workers (``data.num_workers``) with output identical to one process."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from dataeff.cli import main as cli_main
from dataeff.select import embed
from tests.fixtures import make_shards

REPO = Path(__file__).resolve().parents[2]


def test_embeddings_are_byte_identical_for_0_1_and_2_workers(tmp_path, monkeypatch):
    shards = make_shards(tmp_path, n=20, size=48, samples_per_shard=8)  # tars of 8, 8 and 4 samples
    batches = []
    real = embed.embed_batch
    monkeypatch.setattr(embed, "embed_batch", lambda m, x, *a: batches.append(len(x)) or real(m, x, *a))
    arrays = []
    for workers in (0, 1, 2):
        out = tmp_path / f"emb{workers}"
        args = ["embed", "--config", str(REPO / "configs/embed/tiny.yaml"), f"data.shards={shards}", f"out={out}"]
        assert cli_main([*args, "data.batch_size=3", f"data.num_workers={workers}"]) == 0
        with np.load(out / "rank-00000.npz", allow_pickle=False) as z:
            arrays.append((z["keys"].tobytes(), z["embeddings"].tobytes()))
    assert arrays[0] == arrays[1] == arrays[2]
    # Batches of 3 consecutive samples that never span two tars: 3+3+2, 3+3+2, 3+1 per run.
    assert batches == [3, 3, 2, 3, 3, 2, 3, 1] * 3
