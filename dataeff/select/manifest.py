"""The selection manifest: per-sample decisions -> ``selection.parquet`` + ``summary.json``.

Format ``dataeff-selection/1`` (docs/architecture.md "Selection directory"). Building
the table and the summary is pure; only :func:`write_selection` and
:func:`read_selection` touch the disk (temp name, then rename; the summary last, so
its presence means the selection is complete). Every method keeps exactly
:func:`target_count` samples, so methods are compared at the same size.
"""

from __future__ import annotations

import io
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from dataeff.constants import (
    DOWNSTREAM_OVERLAP,
    KEPT,
    NOT_SELECTED,
    REDUNDANT_PREFIX,
    SELECTION_FORMAT,
    SELECTION_NAME,
    SUMMARY_NAME,
)
from dataeff.data import remote
from dataeff.files import write_atomic, write_json_atomic
from dataeff.outputs import output_record

COLUMNS = ("key", "kept", "reason", "cluster", "score", "generated")


@dataclass
class Decisions:
    """What a selection method decided for every sample of the (key-sorted) pool.

    Shape:
        kept (N,) bool; reason (N,) object: "kept", "not_selected", "outlier", "small_cluster",
        "redundant_of:<key>", "dark", "blank", "overexposed", "blurred", "downstream_overlap";
        cluster (N,) int64 (-1 = none); score (N,) float32 (method-specific; MedDEL: cosine
        distance to centroid; NaN = not scored, e.g. excluded before selection).
    """

    kept: np.ndarray
    reason: np.ndarray
    cluster: np.ndarray
    score: np.ndarray
    info: dict[str, Any] = field(default_factory=dict)
    #: Rows for generated samples (columns key, kept, reason, cluster, score), e.g. OptiDEL mosaics.
    generated: pd.DataFrame | None = None

    def __post_init__(self) -> None:
        n = len(self.kept)
        assert len(self.reason) == len(self.cluster) == len(self.score) == n, "decision arrays differ in length"


def target_count(ratio: float, n: int) -> int:
    """round(ratio * n), half up, at least 1 for a non-empty pool."""
    return 0 if n == 0 else max(1, int(math.floor(ratio * n + 0.5)))


def reasons_for(kept: np.ndarray, dropped_reason: np.ndarray) -> np.ndarray:
    """ "kept" where kept, else the drop reason ('' -> "not_selected").

    Shape:
        kept (N,) bool, dropped_reason (N,) object -> (N,) object.
    """
    out = np.where(dropped_reason == "", NOT_SELECTED, dropped_reason).astype(object)
    out[kept] = KEPT
    return out


def redundant_reasons(reason: np.ndarray, redundant: np.ndarray, prev: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """``reason`` with ``redundant_of:<key of the earlier member>`` on the redundant rows.

    Shape:
        reason (N,) object, redundant (N,) bool, prev (N,) int64 row ids, keys (N,) -> (N,) object.
    """
    out = reason.copy()
    for i in np.flatnonzero(redundant):
        out[i] = f"{REDUNDANT_PREFIX}{keys[prev[i]]}"
    return out


def selection_frame(keys: np.ndarray, d: Decisions) -> pd.DataFrame:
    """The manifest table, pool rows (sorted by key) then generated rows."""
    frame = pd.DataFrame(
        {
            "key": np.asarray(keys, dtype=object),
            "kept": d.kept.astype(bool),
            "reason": d.reason.astype(object),
            "cluster": d.cluster.astype(np.int64),
            "score": d.score.astype(np.float32),
            "generated": np.zeros(len(keys), dtype=bool),
        }
    )
    if d.generated is not None and len(d.generated):
        gen = d.generated.assign(generated=True)[list(COLUMNS)]
        frame = pd.concat([frame, gen], ignore_index=True)
    return frame


def reason_family(reason: str) -> str:
    """ "redundant_of:<key>" -> "redundant"; other reasons unchanged."""
    return "redundant" if reason.startswith(REDUNDANT_PREFIX) else reason


def counts_by_reason(frame: pd.DataFrame) -> dict[str, int]:
    """Rows per reason family (:func:`reason_family`), sorted by family."""
    fam = frame["reason"].map(reason_family)
    return {str(k): int(v) for k, v in sorted(fam.value_counts().items())}


def build_summary(
    method: str, ratio: float, frame: pd.DataFrame, config: dict[str, Any], inputs: dict[str, Any], info: dict[str, Any]
) -> dict[str, Any]:
    """``summary.json`` content; N = pool rows (ok samples), kept_fraction = kept / N.

    ``excluded`` counts the pool rows removed before selection (``downstream_overlap``);
    the method chose among the ``eligible`` = N - excluded others, and ``target`` =
    round(R * eligible). kept_fraction stays kept / N: the share of the pool pre-trained on.
    """
    pool = frame[~frame["generated"]]
    n = len(pool)
    kept = int(frame["kept"].sum())
    excluded = int((pool["reason"] == DOWNSTREAM_OVERLAP).sum())
    return {
        "format": SELECTION_FORMAT,
        "method": method,
        "ratio": ratio,
        "pool_size": n,
        "excluded": excluded,
        "eligible": n - excluded,
        "target": info.get("target"),
        "kept": kept,
        "kept_fraction": kept / n if n else 0.0,
        "generated": int(frame["generated"].sum()),
        "counts_by_reason": counts_by_reason(frame),
        **{k: v for k, v in info.items() if k != "target"},
        "config": config,
        "inputs": inputs,
    }


def write_selection(out_dir: str | os.PathLike, frame: pd.DataFrame, summary: dict[str, Any]) -> Path:
    """Write ``selection.parquet`` then ``summary.json`` (each atomically) into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / SELECTION_NAME, lambda p: frame.to_parquet(p, index=False))
    # A later run skips this selection only while the table matches this record.
    summary = {**summary, "outputs": output_record(out, (SELECTION_NAME,))}
    write_json_atomic(out / SUMMARY_NAME, summary, indent=2, default=_jsonable)
    return out / SELECTION_NAME


def _jsonable(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def is_complete(out_dir: str | os.PathLike) -> bool:
    """True when ``out_dir`` (a local path or a URL) holds both manifest files (the summary is written last)."""
    return remote.is_file(remote.join(out_dir, SELECTION_NAME)) and remote.is_file(remote.join(out_dir, SUMMARY_NAME))


def read_selection(out_dir: str | os.PathLike) -> tuple[pd.DataFrame, dict[str, Any]]:
    """The manifest table (columns :data:`COLUMNS`) and summary of a selection directory (or URL).

    Raises:
        ValueError: ``out_dir`` is not a complete ``dataeff select`` output.
    """
    if not is_complete(out_dir):
        raise ValueError(
            f"{out_dir} holds no complete selection ({SELECTION_NAME} + {SUMMARY_NAME}): "
            "point data.selection at a 'dataeff select' output"
        )
    table = pd.read_parquet(io.BytesIO(remote.read_bytes(remote.join(out_dir, SELECTION_NAME))))
    return table, json.loads(remote.read_text(remote.join(out_dir, SUMMARY_NAME)))
