"""The selection manifest: per-sample decisions -> ``selection.parquet`` + ``summary.json``.

Format ``dataeff-selection/1`` (docs/architecture.md "Selection directory"). Building
the table and the summary is pure; only :func:`write_selection` and
:func:`read_selection` touch the disk (temp name, then rename; the summary last, so
its presence means the selection is complete).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from dataeff.files import write_atomic, write_json_atomic

FORMAT = "dataeff-selection/1"
SELECTION_NAME = "selection.parquet"
SUMMARY_NAME = "summary.json"
COLUMNS = ("key", "kept", "reason", "cluster", "score", "generated")


@dataclass
class Decisions:
    """What a selection method decided for every sample of the (key-sorted) pool.

    Shape:
        kept (N,) bool; reason (N,) object: "kept", "not_selected", "outlier", "small_cluster",
        "redundant_of:<key>", "dark", "blank", "overexposed", "blurred"; cluster (N,) int64
        (-1 = none); score (N,) float32 (method-specific; MedDEL: cosine distance to centroid).
    """

    kept: np.ndarray
    reason: np.ndarray
    cluster: np.ndarray
    score: np.ndarray
    info: dict = field(default_factory=dict)
    #: Rows for generated samples (columns key, kept, reason, cluster, score), e.g. OptiDEL mosaics.
    generated: pd.DataFrame | None = None

    def __post_init__(self) -> None:
        n = len(self.kept)
        assert len(self.reason) == len(self.cluster) == len(self.score) == n, "decision arrays differ in length"


def reasons_for(kept: np.ndarray, dropped_reason: np.ndarray) -> np.ndarray:
    """ "kept" where kept, else the drop reason ('' -> "not_selected").

    Shape:
        kept (N,) bool, dropped_reason (N,) object -> (N,) object.
    """
    out = np.where(dropped_reason == "", "not_selected", dropped_reason).astype(object)
    out[kept] = "kept"
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
    return "redundant" if reason.startswith("redundant_of:") else reason


def counts_by_reason(frame: pd.DataFrame) -> dict[str, int]:
    fam = frame["reason"].map(reason_family)
    return {str(k): int(v) for k, v in sorted(fam.value_counts().items())}


def build_summary(
    method: str, ratio: float, frame: pd.DataFrame, config: dict, inputs: dict, info: dict[str, Any]
) -> dict:
    """``summary.json`` content; N = pool rows (ok samples), kept_fraction = kept / N."""
    pool = frame[~frame["generated"]]
    n = len(pool)
    kept = int(frame["kept"].sum())
    return {
        "format": FORMAT,
        "method": method,
        "ratio": ratio,
        "pool_size": n,
        "target": info.get("target"),
        "kept": kept,
        "kept_fraction": kept / n if n else 0.0,
        "generated": int(frame["generated"].sum()),
        "counts_by_reason": counts_by_reason(frame),
        **{k: v for k, v in info.items() if k != "target"},
        "config": config,
        "inputs": inputs,
    }


def write_selection(out_dir: str | os.PathLike, frame: pd.DataFrame, summary: dict) -> Path:
    """Write ``selection.parquet`` then ``summary.json`` (each atomically) into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / SELECTION_NAME, lambda p: frame.to_parquet(p, index=False))
    write_json_atomic(out / SUMMARY_NAME, summary, indent=2, default=_jsonable)
    return out / SELECTION_NAME


def _jsonable(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def is_complete(out_dir: str | os.PathLike) -> bool:
    out = Path(out_dir)
    return (out / SELECTION_NAME).is_file() and (out / SUMMARY_NAME).is_file()


def read_selection(out_dir: str | os.PathLike) -> tuple[pd.DataFrame, dict]:
    """The manifest table and summary of a selection directory."""
    out = Path(out_dir)
    if not is_complete(out):
        raise ValueError(f"{out_dir} holds no complete selection ({SELECTION_NAME} + {SUMMARY_NAME})")
    return pd.read_parquet(out / SELECTION_NAME), json.loads((out / SUMMARY_NAME).read_text())
