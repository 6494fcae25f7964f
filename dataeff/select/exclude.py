"""Leakage exclusion for ``dataeff select``: drop the pool samples that copy downstream images.

``dataeff overlap`` (docs/overlap.md) writes ``<dir>/matches.parquet`` and, last,
``<dir>/summary.json``. Select reads them here, not through ``overlap.py``, so the
selection stage needs no encoder or dataset code. The excluded samples are removed
*before* any method runs, for every method, so no method can "win" by pre-training on
test images:

- they stay in the manifest with ``kept=false``, reason :data:`DOWNSTREAM_OVERLAP`,
  cluster -1 and score NaN (never scored);
- the method sees only the eligible pool (N - excluded samples) and keeps
  round(R * N_eligible) of it — the exclusion is not charged to the method's budget;
- ``summary.json`` keeps ``pool_size`` = every ok sample, adds ``excluded`` and
  ``eligible``, and ``kept_fraction`` stays kept / pool_size (the R NormDEL uses: the
  fraction of the *pool* the model was pre-trained on).

The overlap directory must have been made from the same shard set (its keys name pool
samples) and the same encoder (its embedding signal) as the select input; otherwise it
is refused with a :class:`ConfigError`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from dataeff.config import ConfigError
from dataeff.constants import DOWNSTREAM_OVERLAP, OVERLAP_FORMAT, SUMMARY_NAME
from dataeff.files import file_sha256
from dataeff.overlap_core import MATCH_COLUMNS, excluded_keys
from dataeff.select.manifest import Decisions, Reasons

#: The overlap stage's match table (``dataeff/overlap.py`` writes it under this name).
MATCHES_NAME = "matches.parquet"


@dataclass
class Exclusion:
    """Pool keys to drop before selection, with where they came from.

    Attributes:
        keys: pool keys matched to a downstream image by any signal.
        matched: pool key -> ``"<dataset>/<file>"`` of one downstream image it copies (gallery captions).
        inputs: what ``summary.json`` records under ``inputs`` (directory, summary hash).
    """

    keys: set[str] = field(default_factory=set)
    matched: dict[str, str] = field(default_factory=dict)
    inputs: dict[str, Any] = field(default_factory=dict)


def read_exclusion(overlap_dir: str | os.PathLike, header: dict[str, Any], pool_keys: Iterable[str]) -> Exclusion:
    """The pool keys an overlap directory excludes, after checking it belongs to this select input.

    Args:
        overlap_dir: a ``dataeff overlap`` output directory.
        header: the select input's embeddings ``header.json`` (``shard_set_hash``, ``encoder.sha256``).
        pool_keys: the ok keys of the pool's shard index.

    Raises:
        ConfigError: the directory is missing or incomplete, was made from other embeddings
            (shard set or encoder), or names keys the pool does not have.
    """
    root = Path(overlap_dir)
    summary_path, matches_path = root / SUMMARY_NAME, root / MATCHES_NAME
    if not summary_path.is_file() or not matches_path.is_file():
        raise ConfigError(
            f"exclude={overlap_dir}: no complete 'dataeff overlap' output ({MATCHES_NAME} + {SUMMARY_NAME}); "
            f"run 'dataeff overlap embeddings=<the same embeddings> out={overlap_dir} datasets.<name>=<root>' first"
        )
    summary = json.loads(summary_path.read_text())
    if summary.get("format") != OVERLAP_FORMAT:
        raise ConfigError(f"exclude={overlap_dir}: {SUMMARY_NAME} is not {OVERLAP_FORMAT} ({summary.get('format')!r})")
    check_same_embeddings(summary.get("inputs", {}), header, str(overlap_dir))
    matches = pd.read_parquet(matches_path)
    missing = [c for c in MATCH_COLUMNS if c not in matches.columns]
    if missing:
        raise ConfigError(f"exclude={overlap_dir}: {MATCHES_NAME} lacks columns {missing}; re-run 'dataeff overlap'")
    # An empty table (no leakage: the usual case) can come back with float columns, which
    # excluded_keys' string handling refuses; nothing matched means nothing to exclude.
    keys = excluded_keys(matches.astype({"pool_key": str, "signals": str})) if len(matches) else set()
    unknown = sorted(keys - set(pool_keys))
    if unknown:
        raise ConfigError(
            f"exclude={overlap_dir}: {len(unknown)} excluded key(s) are not ok samples of this pool "
            f"(e.g. {unknown[0]}); the overlap was made for another pool"
        )
    first = matches.drop_duplicates("pool_key")
    matched = {str(k): f"{d}/{f}" for k, d, f in zip(first["pool_key"], first["dataset"], first["file"], strict=True)}
    inputs = {
        "exclude": os.path.abspath(overlap_dir),
        "exclude_summary_sha256": file_sha256(summary_path),
        "exclude_signals": summary.get("inputs", {}).get("signals"),
    }
    return Exclusion(keys=keys, matched=matched, inputs=inputs)


def check_same_embeddings(overlap_inputs: dict[str, Any], header: dict[str, Any], where: str) -> None:
    """Refuse an overlap result made from another shard set or encoder than the select input.

    The shard-set hash decides whether its keys name this pool's samples; the encoder's
    sha256 whether its embedding signal was judged in the same space.

    Raises:
        ConfigError: naming the differing input.
    """
    theirs = overlap_inputs.get("shard_set_hash")
    if theirs != header.get("shard_set_hash"):
        raise ConfigError(
            f"exclude={where} was made from another shard set (shard_set_hash {theirs} vs "
            f"{header.get('shard_set_hash')} of the select embeddings); re-run 'dataeff overlap' on these embeddings"
        )
    enc = overlap_inputs.get("encoder_sha256")
    if enc != header.get("encoder", {}).get("sha256"):
        raise ConfigError(
            f"exclude={where} was made from embeddings of another encoder (encoder sha256 {enc} vs "
            f"{header.get('encoder', {}).get('sha256')}); re-run 'dataeff overlap' on the select embeddings"
        )


def eligible_mask(keys: np.ndarray, excluded: set[str]) -> np.ndarray:
    """True for the samples a method may select.

    Shape:
        keys: (N,) str -> (N,) bool.
    """
    if not excluded:
        return np.ones(len(keys), dtype=bool)
    return ~np.isin(np.asarray(keys, dtype=str), np.array(sorted(excluded), dtype=str))


def expand_decisions(sub: Decisions, eligible: np.ndarray) -> Decisions:
    """A method's decisions over the eligible rows, spread back over the whole pool.

    Excluded rows get ``kept=false``, reason :data:`DOWNSTREAM_OVERLAP`, cluster -1 and
    score NaN; info and generated rows are passed through.

    Shape:
        sub: decisions for E rows, eligible: (N,) bool with E true -> decisions for N rows.
    """
    n = len(eligible)
    if len(sub.kept) != int(eligible.sum()):
        raise ValueError(f"decisions for {len(sub.kept)} rows, {int(eligible.sum())} eligible")
    if eligible.all():
        return sub
    kept = np.zeros(n, dtype=bool)
    cluster = np.full(n, -1, dtype=sub.cluster.dtype)
    score = np.full(n, np.nan, dtype=np.float32)
    kept[eligible], cluster[eligible], score[eligible] = sub.kept, sub.cluster, sub.score
    if isinstance(sub.reason, Reasons):
        reason: np.ndarray | Reasons = sub.reason.spread(eligible, DOWNSTREAM_OVERLAP)
    else:
        reason = np.full(n, DOWNSTREAM_OVERLAP, dtype=object)
        reason[eligible] = sub.reason
    return Decisions(kept, reason, cluster, score, sub.info, sub.generated)
