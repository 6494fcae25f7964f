"""Planted-defect audit: how well a selection's drops match a pool's ground truth.

Pure pandas over the manifest table, the shard index and the truth CSV (format
``dataeff-truth/1``: source, planted in {none, near_duplicate, invalid}, kind, twin).
Rows are matched by the index's ``source``; a frame of a multi-frame file (a video, a
multi-frame DICOM) is named ``<source>#<frame>`` in the truth's ``source`` and ``twin``.
Files the shard stage already rejected (truncated, not an image, ...) never reach
selection and are counted apart as caught at shard time.

Scoring, per drop reason:
- quality reasons (dark, blank, overexposed, blurred) are right when the sample is a
  planted invalid frame;
- ``redundant_of:<key>`` is right when both samples belong to the same planted
  near-duplicate group (an original and its copies; either may be the one dropped);
- ``outlier`` / ``small_cluster`` are right when the sample is planted at all.
Recall, per planted category and kind: the share of planted samples that reached
selection and were dropped for a matching reason (a near-duplicate counts as found
when it or its group-mate was dropped as redundant of the other).

Composition, for every method (random and OptiDEL drop without reasons, so precision
and recall say nothing about them): the share of the kept originals that are planted
invalid frames, and of excess near-duplicates (in each planted group, every kept member
after the first), beside the same shares in the whole pool that reached selection.

Groups (the index's ``group``: a sample's video or DICOM study, a still image on its own;
an index written before ``dataeff-shards/4`` counts every source as its own group): how many
groups the pool and the kept subset cover, and how many redundancy drops were of a frame of
the same group (neighbouring frames) or of another group. Needs no truth file.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from dataeff.config import ConfigError, option
from dataeff.constants import (
    EMBEDDING_REASONS,
    KEPT,
    NOT_SELECTED,
    QUALITY_REASONS,
    REDUNDANT_PREFIX,
    TRUTH_FORMAT,
)

#: Columns of a ground-truth CSV.
TRUTH_COLUMNS = ("source", "planted", "kind", "twin")
#: Separates a multi-frame file's path from a frame number in a truth CSV (``clip.mp4#12``).
FRAME_MARK = "#"


@dataclass
class AuditConfig:
    """Planted-defect audit of the selection (printed and stored in summary.json)."""

    truth: str = option("", help="planted-defect ground truth CSV (format dataeff-truth/1); empty = no audit")


def read_truth(path: str) -> pd.DataFrame:
    """The ground-truth CSV at ``path`` (every column as str).

    Raises:
        ConfigError: the file is missing or lacks a column of :data:`TRUTH_COLUMNS`.
    """
    if not Path(path).is_file():
        raise ConfigError(f"audit.truth={path}: no such file")
    truth = pd.read_csv(path, dtype=str, keep_default_na=False)
    if not set(TRUTH_COLUMNS) <= set(truth.columns):
        raise ConfigError(f"audit.truth={path}: needs columns {sorted(TRUTH_COLUMNS)} (format {TRUTH_FORMAT})")
    return truth


def _ratio(a: int, b: int) -> float | None:
    return round(a / b, 4) if b else None


def locators(index: pd.DataFrame) -> pd.Series:
    """How a truth CSV names each index row: its ``source``, plus ``#<frame>`` for a frame."""
    if "frame" not in index.columns:
        return index["source"]
    return index["source"].where(index["frame"] < 0, index["source"] + FRAME_MARK + index["frame"].astype(str))


def sample_groups(index: pd.DataFrame) -> pd.Series:
    """The group of each index row (its ``source`` for an index without a ``group`` column)."""
    return index["group"] if "group" in index.columns else index["source"]


def group_coverage(frame: pd.DataFrame, index: pd.DataFrame) -> dict[str, int]:
    """Groups covered by the pool and the kept subset, and redundancy drops within / across groups."""
    ok = index[index["status"] == "ok"]
    group = pd.Series(sample_groups(ok).values, index=ok["key"].values)
    rows = frame[~frame["generated"]]
    target = rows["reason"].astype(str).str.extract(f"^{re.escape(REDUNDANT_PREFIX)}(.*)$")[0]
    dropped = rows[target.notna()]
    own = group.reindex(dropped["key"].values).values
    other = group.reindex(target[target.notna()].values).values
    same = int(((own == other) & pd.notna(own)).sum())
    return {
        "pool": int(group.reindex(rows["key"].values).nunique()),
        "kept": int(group.reindex(rows.loc[rows["kept"], "key"].values).nunique()),
        "redundant_same_group": same,
        "redundant_other_group": len(dropped) - same,
    }


def audit_selection(frame: pd.DataFrame, index: pd.DataFrame, truth: pd.DataFrame) -> dict[str, Any]:
    """Precision/recall of dropped samples against planted defects (see module docstring)."""
    truth = truth.copy()
    idx = index.assign(locator=locators(index)).drop_duplicates("locator").set_index("locator")
    truth["in_index"] = truth["source"].isin(idx.index)
    truth["status"] = truth["source"].map(idx["status"]).fillna("missing")
    truth["key"] = truth["source"].map(idx["key"])
    planted = truth[truth["planted"] != "none"]
    at_shard = planted[planted["status"] != "ok"]
    shard_caught = {str(k): int(v) for k, v in at_shard.groupby("kind").size().items()}

    rows = frame[~frame["generated"]].set_index("key")
    t = truth[truth["status"] == "ok"].set_index("key")
    group = t["twin"].where((t["planted"] == "near_duplicate") & (t["twin"] != ""), t["source"])
    reason = rows["reason"].astype(str)
    target = reason.str.extract(f"^{re.escape(REDUNDANT_PREFIX)}(.*)$")[0]
    family = reason.where(target.isna(), "redundant")
    planted_kind = t["planted"].reindex(rows.index).fillna("none")
    grp = group.reindex(rows.index)
    same_group = target.notna() & (grp.values == group.reindex(target.fillna("").values).values)
    involves_dup = (planted_kind == "near_duplicate") | planted_kind.reindex(target.fillna("").values).fillna(
        "none"
    ).eq("near_duplicate").values
    correct = np.where(
        family.isin(QUALITY_REASONS),
        planted_kind == "invalid",
        np.where(family == "redundant", same_group & involves_dup, planted_kind != "none"),
    )
    dropped = ~family.isin([KEPT, NOT_SELECTED])
    per_reason = {}
    for fam in sorted(set(family[dropped])):
        sel = dropped & (family == fam)
        per_reason[fam] = {
            "dropped": int(sel.sum()),
            "planted": int((sel & (planted_kind != "none")).sum()),
            "correct": int((sel & correct).sum()),
            "precision": _ratio(int((sel & correct).sum()), int(sel.sum())),
        }

    # Recall: planted samples that reached selection.
    found_dup = set()
    for k in rows.index[family == "redundant"]:
        other = target[k]
        if grp[k] == group.get(other, None):
            found_dup.update([k, other])
    reached = planted[planted["status"] == "ok"]
    per_kind: dict[str, dict[str, Any]] = {}
    per_cat: dict[str, dict[str, Any]] = {}
    for kind, sub in reached.groupby("kind"):
        keys = sub["key"].tolist()
        fam = family.reindex(keys)
        if (sub["planted"] == "invalid").all():
            hit = fam.isin(QUALITY_REASONS + EMBEDDING_REASONS)
        else:
            hit = pd.Series([k in found_dup for k in keys], index=keys)
        per_kind[str(kind)] = {
            "reached_select": len(keys),
            "found": int(hit.sum()),
            "recall": _ratio(int(hit.sum()), len(keys)),
            "dropped_any_reason": int(fam.isin(list(set(family[dropped]))).sum()),
        }
    for cat in ("invalid", "near_duplicate"):
        kinds = reached.loc[reached["planted"] == cat, "kind"].unique()
        n = sum(per_kind[str(k)]["reached_select"] for k in kinds)
        f = sum(per_kind[str(k)]["found"] for k in kinds)
        per_cat[cat] = {
            "reached_select": n,
            "found": f,
            "recall": _ratio(f, n),
            "caught_at_shard": int((at_shard["planted"] == cat).sum()),
        }
    n_drop, n_ok = int(dropped.sum()), int((dropped & correct).sum())

    def composition(keys: pd.Index) -> dict:
        invalid = int((planted_kind.reindex(keys) == "invalid").sum())
        excess = int((grp.reindex(keys).value_counts() - 1).sum())  # value_counts: NaN (not in truth) left out
        return {
            "samples": len(keys),
            "invalid": invalid,
            "invalid_share": _ratio(invalid, len(keys)),
            "excess_duplicates": excess,
            "excess_duplicate_share": _ratio(excess, len(keys)),
        }

    return {
        "truth_rows": len(truth),
        "truth_rows_not_in_index": int((~truth["in_index"]).sum()),
        "caught_at_shard_time": shard_caught,
        "dropped": n_drop,
        "precision": _ratio(n_ok, n_drop),
        "recall": _ratio(sum(c["found"] for c in per_cat.values()), sum(c["reached_select"] for c in per_cat.values())),
        "per_reason": per_reason,
        "per_category": per_cat,
        "per_kind": per_kind,
        "kept": composition(rows.index[family == KEPT]),
        "pool": composition(rows.index),
        "groups": group_coverage(frame, index),
    }


def format_audit(a: dict[str, Any]) -> str:
    """A readable table of :func:`audit_selection`'s result (printed on stdout by select)."""
    lines = [
        f"planted-defect audit: dropped {a['dropped']}, precision {a['precision']}, recall {a['recall']}",
        "| drop reason | dropped | planted | correct | precision |",
        "|---|---|---|---|---|",
    ]
    for r, v in a["per_reason"].items():
        lines.append(f"| {r} | {v['dropped']} | {v['planted']} | {v['correct']} | {v['precision']} |")
    lines += ["| planted kind | reached select | found | recall |", "|---|---|---|---|"]
    for k, v in a["per_kind"].items():
        lines.append(f"| {k} | {v['reached_select']} | {v['found']} | {v['recall']} |")
    kept, pool = a["kept"], a["pool"]
    lines.append(
        f"kept {kept['samples']}: invalid share {kept['invalid_share']} (pool {pool['invalid_share']}), "
        f"excess near-duplicate share {kept['excess_duplicate_share']} (pool {pool['excess_duplicate_share']})"
    )
    g = a["groups"]
    lines.append(
        f"groups (videos, studies; a still image is its own): kept {g['kept']} of {g['pool']}; redundancy drops "
        f"of a frame of the same group {g['redundant_same_group']}, of another group {g['redundant_other_group']}"
    )
    if a["caught_at_shard_time"]:
        lines.append(
            "caught at shard time (never reach select): "
            + ", ".join(f"{k} {v}" for k, v in a["caught_at_shard_time"].items())
        )
    return "\n".join(lines)
