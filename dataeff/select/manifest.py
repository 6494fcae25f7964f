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
    REASON_CODES,
    REDUNDANT_PREFIX,
    SELECTION_FORMAT,
    SELECTION_NAME,
    SUMMARY_NAME,
)
from dataeff.data import remote
from dataeff.files import write_atomic, write_json_atomic
from dataeff.outputs import output_record
from dataeff.select.cluster import index_dtype

COLUMNS = ("key", "kept", "reason", "cluster", "score", "generated")
#: The :class:`Reasons` codes the methods set themselves (the others come from the reasons' names).
KEPT_CODE, REDUNDANT_CODE = REASON_CODES.index(KEPT), REASON_CODES.index(REDUNDANT_PREFIX)


@dataclass
class Reasons:
    """Per-sample reasons as one-byte codes (:data:`~dataeff.constants.REASON_CODES`), strings only when written.

    Every rank holds the decisions for the whole pool: as strings that is a Python object per
    sample (``redundant_of:<key>``: ~80 bytes); as codes, one byte plus the row of the
    duplicated sample, and only the rank that writes the manifest makes the strings.

    Shape:
        code (N,) uint8; of (N,) int row (same pool) of the sample a ``redundant_of`` sample
        duplicates, -1 elsewhere.
    """

    code: np.ndarray
    of: np.ndarray

    def __len__(self) -> int:
        return len(self.code)

    def strings(self, keys: np.ndarray) -> np.ndarray:
        """The reasons as written (code 0 -> ``not_selected``), ``redundant_of:`` with the key of row ``of``.

        Shape:
            keys (N,) -> (N,) object.
        """
        out = np.array(REASON_CODES, dtype=object)[self.code]
        redundant = np.flatnonzero(self.code == REDUNDANT_CODE)
        for i, key in zip(redundant, keys[self.of[redundant]], strict=True):
            out[i] = f"{REDUNDANT_PREFIX}{key}"
        return out

    def spread(self, eligible: np.ndarray, fill: str) -> Reasons:
        """These reasons of the ``eligible`` rows of a pool over the whole pool; the other rows get ``fill``.

        Shape:
            eligible: (N,) bool with len(self) true -> N rows, ``of`` renumbered to pool rows.
        """
        code = np.full(len(eligible), REASON_CODES.index(fill), dtype=np.uint8)
        code[eligible] = self.code
        rows = np.flatnonzero(eligible)
        of = np.full(len(eligible), -1, dtype=index_dtype(len(eligible)))
        of[eligible] = np.where(self.of >= 0, rows[np.maximum(self.of, 0)], -1)
        return Reasons(code, of)


@dataclass
class Decisions:
    """What a selection method decided for every sample of the (key-sorted) pool.

    Shape:
        kept (N,) bool; reason (N,) object: "kept", "not_selected", "outlier", "small_cluster",
        "redundant_of:<key>", "dark", "blank", "overexposed", "blurred", "downstream_overlap"
        (MedDEL and SemDeDup: the same as :class:`Reasons` codes); cluster (N,) int (-1 = none);
        score (N,) float32 (method-specific; MedDEL: cosine distance to centroid; NaN = not
        scored, e.g. excluded before selection).
    """

    kept: np.ndarray
    reason: np.ndarray | Reasons
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


def decided_reasons(dropped: np.ndarray, kept: np.ndarray, redundant: np.ndarray, prev: np.ndarray) -> Reasons:
    """The reasons of a selection: kept, else redundant of row ``prev``, else ``dropped``'s code.

    ``dropped`` holds the codes of the samples dropped before the selection (0 = none,
    written ``not_selected`` when not kept); a sample it marks :data:`REDUNDANT_CODE` (a
    near-copy) already has its row in ``prev``. Both arrays are reused as the result's.

    Shape:
        dropped (N,) uint8, kept/redundant (N,) bool, prev (N,) int rows -> :class:`Reasons`.
    """
    dropped[redundant] = REDUNDANT_CODE
    dropped[kept] = KEPT_CODE
    prev[dropped != REDUNDANT_CODE] = -1
    return Reasons(dropped, prev)


def selection_frame(keys: np.ndarray, d: Decisions) -> pd.DataFrame:
    """The manifest table, pool rows (sorted by key) then generated rows."""
    frame = pd.DataFrame(
        {
            "key": np.asarray(keys, dtype=object),
            "kept": d.kept.astype(bool),
            "reason": d.reason.strings(keys) if isinstance(d.reason, Reasons) else d.reason.astype(object),
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
