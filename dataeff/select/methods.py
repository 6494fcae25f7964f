"""The selection methods: name -> shell function. Adding a method = one import and one line here.

Every shell has the signature :data:`MethodFn`,
``fn(embeddings, keys, quality, cfg, rank, world) -> Decisions``, and returns the same
decisions on every rank.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pandas as pd

from dataeff.select.baselines_run import run_full, run_random
from dataeff.select.config import METHOD_NAMES, SelectConfig
from dataeff.select.manifest import Decisions
from dataeff.select.meddel_run import run_meddel
from dataeff.select.optidel_run import run_optidel
from dataeff.select.semdedup_run import run_semdedup

#: ``(emb (N, D) float16, keys (N,) sorted, quality rows aligned to keys, cfg, rank, world) -> Decisions``.
MethodFn = Callable[[np.ndarray, np.ndarray, pd.DataFrame | None, SelectConfig, int, int], Decisions]

METHODS: dict[str, MethodFn] = {
    "full": run_full,
    "random": run_random,
    "semdedup": run_semdedup,
    "meddel": run_meddel,
    "optidel": run_optidel,
}
assert tuple(METHODS) == METHOD_NAMES, "config.MethodName and METHODS list different methods"
