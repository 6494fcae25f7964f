"""Select-stage shells of the ``full`` and ``random`` baselines (cores in ``baselines.py``).

Neither needs the embeddings or collectives: every rank computes the same decisions
from the pool size and the seed alone.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from dataeff.select.baselines import select_random
from dataeff.select.config import SelectConfig
from dataeff.select.manifest import Decisions, reasons_for, target_count


def run_full(
    emb: np.ndarray, keys: np.ndarray | None, quality: pd.DataFrame | None, cfg: SelectConfig, rank: int, world: int
) -> Decisions:
    """Every sample kept (the 100% reference).

    Shape:
        emb: (N, D), keys: (N,) sorted or None (unread) -> decisions for N rows (no clusters, score 0).
    """
    n = len(emb)
    kept = np.ones(n, dtype=bool)
    return Decisions(kept, reasons_for(kept, np.full(n, "", object)), np.full(n, -1, np.int64), np.zeros(n, np.float32))


def run_random(
    emb: np.ndarray, keys: np.ndarray | None, quality: pd.DataFrame | None, cfg: SelectConfig, rank: int, world: int
) -> Decisions:
    """round(R*N) samples uniformly at random (seeded by ``cfg.seed``).

    Shape:
        emb: (N, D), keys: (N,) sorted or None (unread) -> decisions for N rows (no clusters, score = the draw).
    """
    n = len(emb)
    kept, score = select_random(n, target_count(cfg.ratio, n), cfg.seed)
    return Decisions(
        kept, reasons_for(kept, np.full(n, "", object)), np.full(n, -1, np.int64), score.astype(np.float32)
    )
