"""The selection methods: name -> shell function. Adding a method = one import and one line here.

Every shell has the signature :data:`MethodFn`,
``fn(embeddings, keys, quality, cfg, rank, world) -> Decisions``, and returns the same
decisions on every rank. A method takes the pool size from ``len(embeddings)``: on a
partitioned pool it gets ``keys=None`` unless it is in :data:`READS_KEYS`.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pandas as pd

from dataeff.constants import QUALITY_KEYS, SIGNATURE_KEYS
from dataeff.select.baselines_run import run_full, run_random
from dataeff.select.config import METHOD_NAMES, SelectConfig
from dataeff.select.manifest import Decisions
from dataeff.select.meddel_run import run_meddel
from dataeff.select.optidel_run import run_optidel
from dataeff.select.semdedup_run import run_semdedup

#: ``(emb (N, D) float16, keys (N,) sorted or None, quality rows aligned to keys, cfg, rank, world) -> Decisions``.
MethodFn = Callable[[np.ndarray, np.ndarray | None, pd.DataFrame | None, SelectConfig, int, int], Decisions]

METHODS: dict[str, MethodFn] = {
    "full": run_full,
    "random": run_random,
    "semdedup": run_semdedup,
    "meddel": run_meddel,
    "optidel": run_optidel,
}
assert tuple(METHODS) == METHOD_NAMES, "config.MethodName and METHODS list different methods"

#: Methods that read the pool keys on every rank (OptiDEL locates images by key). The others get
#: None on a partitioned pool: only the manifest needs the keys, and rank 0 reads them again for it.
READS_KEYS = frozenset({"optidel"})


def index_columns(cfg: SelectConfig) -> tuple[str, ...]:
    """The shard-index columns the method reads; every rank holds only these, for the whole pool.

    An index row carries ~750 bytes (thumbnails, hashes, paths): at 10M images, ~7 GiB per rank.
    """
    columns = ["key", "status", *QUALITY_KEYS]
    if cfg.method == "meddel" and (cfg.meddel.phash or cfg.meddel.near_copies):
        columns += SIGNATURE_KEYS
    if cfg.method in READS_KEYS:
        columns.append("shard")
    return tuple(columns)
