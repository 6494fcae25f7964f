"""The report's numbers, as pure functions of loaded (cell, seed) units: no I/O, no plotting.

- :func:`seed_table`: one row per (method, ratio, seed, dataset): what each run scored.
- :func:`summary_table`: one row per (method, ratio, dataset): mean and 95% Student-t
  interval over seeds (:func:`dataeff.stats.mean_ci`) of mIoU, Dice, NormDEL and, when the
  fine-tuning scored per image, per-image Dice.
- :func:`comparisons`: every method against ``random`` (same ratio), ``full`` and
  ``scratch``, paired by seed (:func:`dataeff.stats.paired_diff`), with one sentence each.
- :func:`scratch_verdicts`: per dataset, whether any pre-training beat no pre-training.

A loaded unit is a dict (see ``report.load_unit``): ``method, ratio, seed, cell, datasets,
done, stages, selection, pretrain, pretrain_config, finetune: {dataset: results.json}``.
Fields that older outputs lack (per-image scores, budget, scoring) come out NaN or '',
printed as "–".
"""

from __future__ import annotations

import math
from typing import Any

import pandas as pd

from dataeff.metrics import del_score, normdel
from dataeff.overlap_core import KINDS
from dataeff.stats import Interval, low_at_level, mean_ci, paired_diff, verdict_sentence
from dataeff.sweep_layout import SCRATCH

#: Pseudo-dataset of the per-seed mean over downstream datasets (the papers' NormDEL uses it).
MEAN = "mean"
#: Metrics summarised over seeds: column in :func:`seed_table` -> label.
METRICS = {"miou": "mIoU", "dice": "Dice", "dice_img": "per-image Dice", "normdel": "NormDEL"}
#: Confidence level of every interval in the report.
LEVEL = 0.95
#: Display names of the methods in sentences.
NAMES = {"meddel": "MedDEL", "optidel": "OptiDEL", "semdedup": "SemDeDup"}
#: A kept fraction this far (relative) from its nominal ratio is plotted at its real R and labelled.
R_TOLERANCE = 0.05


def _num(value: Any) -> float:
    """A JSON number as float; None (how results.json stores NaN), '' and missing -> NaN."""
    try:
        return math.nan if value is None or value == "" else float(value)
    except (TypeError, ValueError):
        return math.nan


def _nanmean(values: list[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return sum(finite) / len(finite) if finite else math.nan


def display_name(method: str, ratio: float) -> str:
    """``MedDEL 5%``, ``full``, ``scratch``: how a cell is named in sentences."""
    name = NAMES.get(method, method)
    return name if method in ("full", SCRATCH) else f"{name} {100 * ratio:g}%"


def off_nominal(ratio: float, kept_fraction: float) -> bool:
    """True when a cell kept a fraction clearly different from its nominal ratio (e.g. OptiDEL short of mosaics)."""
    if math.isnan(kept_fraction) or ratio <= 0:
        return False
    return abs(kept_fraction - ratio) > R_TOLERANCE * ratio


# --------------------------------------------------------------------------- per seed


def _unit_common(unit: dict[str, Any]) -> dict[str, Any]:
    sel = unit.get("selection") or {}
    pre = unit.get("pretrain") or {}
    scratch = unit["method"] == SCRATCH
    wall = pre.get("wall_time_s", pre.get("wall_s"))
    return {
        "method": unit["method"],
        "ratio": 0.0 if scratch else float(unit["ratio"]),
        "seed": int(unit.get("seed", 0)),
        "kept": 0.0 if scratch else _num(sel.get("kept", unit.get("kept"))),
        "pool_size": _num(sel.get("pool_size", unit.get("pool_size"))),
        # R = 0 for scratch: no pre-training data at all.
        "kept_fraction": 0.0 if scratch else _num(sel.get("kept_fraction", unit.get("kept_fraction"))),
        "images_seen": 0.0 if scratch else _num(pre.get("images_seen", unit.get("images_seen"))),
        "pretrain_steps": 0.0 if scratch else _num(pre.get("steps", unit.get("pretrain_steps"))),
        "epochs_seen": 0.0 if scratch else _num(pre.get("epochs_seen")),
        "budget": "" if scratch else str(pre.get("budget", "")),
        "pretrain_hours": math.nan if wall is None else float(wall) * int(pre.get("world_size", 1)) / 3600.0,
        "device": str(pre.get("device", "")) if pre else "",
        "wall_s": sum(float(s.get("wall_s", 0.0)) for s in (unit.get("stages") or {}).values()),
        "done": bool(unit.get("done", False)),
    }


def _scores(res: dict[str, Any]) -> dict[str, Any]:
    per_image = res.get("per_image") or {}
    encoder = res.get("encoder")
    return {
        "miou": _num(res.get("miou")),
        "dice": _num(res.get("dice")),
        "fg_iou": _num(res.get("fg_iou")),
        "dice_img": _num(per_image.get("dice_mean")),
        "iou_img": _num(per_image.get("iou_mean")),
        "n_img": _num(per_image.get("n")),
        "scoring": str(res.get("scoring", "")),
        "encoder_init": encoder if isinstance(encoder, str) else "",
        "n_train": _num(res.get("n_train")),
        "label_draw": bool(res.get("label_draw", False)),
        "encoder_frozen": bool(res.get("encoder_frozen", False)),
        "n_val": _num(res.get("n_val")),
        "n_test": _num(res.get("n_test")),
    }


def seed_table(units: list[dict[str, Any]], alpha: float) -> pd.DataFrame:
    """One row per (method, ratio, seed, dataset), plus a ``mean`` dataset row per unit with several datasets.

    NormDEL uses the unit's own kept fraction as R (PAPERS.md, NormDEL) and its mIoU as a
    fraction; the ``mean`` row averages mIoU over the unit's datasets first, as the papers do.
    A dataset without results gets NaN scores (and NaN in the mean).
    """
    rows: list[dict[str, Any]] = []
    for unit in units:
        common = _unit_common(unit)
        results = unit.get("finetune") or {}
        datasets = list(unit.get("datasets") or sorted(results))
        per_ds = []
        for ds in datasets:
            row = {**common, "dataset": ds, **_scores(results.get(ds) or {})}
            per_ds.append(row)
        if len(datasets) > 1:
            mean = {**common, "dataset": MEAN, **_scores({})}
            for key in ("miou", "dice", "fg_iou", "dice_img", "iou_img"):
                mean[key] = (
                    _nanmean([r[key] for r in per_ds]) if all(not math.isnan(r[key]) for r in per_ds) else math.nan
                )
            per_ds.append(mean)
        for row in per_ds:
            # NormDEL is defined for R in (0, 1]: scratch (R = 0, no pre-training data) has none.
            ok = not (math.isnan(row["miou"]) or math.isnan(row["kept_fraction"])) and row["kept_fraction"] > 0
            row["del"] = del_score(row["miou"], row["kept_fraction"], alpha) if ok else math.nan
            row["normdel"] = normdel(row["miou"], row["kept_fraction"], alpha) if ok else math.nan
        rows += per_ds
    if not rows:
        return pd.DataFrame(columns=list(SEED_COLUMNS))
    df = pd.DataFrame(rows)[list(SEED_COLUMNS)]
    return df.sort_values(["dataset", "method", "ratio", "seed"], kind="stable").reset_index(drop=True)


#: Columns of :func:`seed_table` (and ``report_seeds.csv``), in order.
SEED_COLUMNS = (
    *("method", "ratio", "seed", "dataset", "miou", "dice", "fg_iou", "dice_img", "iou_img", "n_img"),
    *("del", "normdel", "kept", "pool_size", "kept_fraction", "images_seen", "pretrain_steps", "epochs_seen"),
    *("budget", "pretrain_hours", "device", "scoring", "encoder_init", "n_train", "n_val", "n_test", "wall_s", "done"),
    *("label_draw", "encoder_frozen"),
)


# --------------------------------------------------------------------------- over seeds


def summary_table(seeds: pd.DataFrame, level: float = LEVEL) -> pd.DataFrame:
    """One row per (method, ratio, dataset): ``n_seeds``, ``<metric>_mean/_ci_low/_ci_high``, budget facts.

    ``n_seeds`` counts the seeds with an mIoU; the interval is :func:`dataeff.stats.mean_ci`
    (NaN bounds with one seed). ``kept``, ``kept_fraction`` and ``images_seen`` are means
    over seeds (equal across seeds unless a method's output size depends on its seed).
    """
    rows = []
    for (ds, method, ratio), part in seeds.groupby(["dataset", "method", "ratio"], sort=True):
        row: dict[str, Any] = {"method": method, "ratio": float(ratio), "dataset": ds}
        row["n_seeds"] = int(part["miou"].notna().sum())
        row["seeds"] = " ".join(str(s) for s in sorted(part["seed"]))
        for metric in METRICS:
            ci = mean_ci(part[metric], level)
            row.update({f"{metric}_mean": ci.mean, f"{metric}_ci_low": ci.low, f"{metric}_ci_high": ci.high})
        for col in ("kept", "pool_size", "kept_fraction", "images_seen", "pretrain_steps", "epochs_seen"):
            row[col] = _nanmean(list(part[col]))
        row["pretrain_hours"] = _nanmean(list(part["pretrain_hours"]))
        row["budget"] = ",".join(sorted({b for b in part["budget"] if b}))
        row["scoring"] = ",".join(sorted({s for s in part["scoring"] if s}))
        row["device"] = ",".join(sorted({d for d in part["device"] if d}))
        row["off_nominal"] = method != SCRATCH and off_nominal(float(ratio), row["kept_fraction"])
        row["done"] = bool(part["done"].all())
        rows.append(row)
    if not rows:
        return pd.DataFrame(columns=["method", "ratio", "dataset", "n_seeds", "miou_mean"])
    df = pd.DataFrame(rows)
    # Scratch first (the reference every row is read against), then methods by name and ratio.
    order = df["method"].map(lambda m: (m != SCRATCH, m))
    df = df.assign(_o=order).sort_values(["dataset", "_o", "ratio"], kind="stable").drop(columns="_o")
    return df.reset_index(drop=True)


def _by_seed(seeds: pd.DataFrame, dataset: str, method: str, ratio: float, metric: str) -> dict[int, float]:
    part = seeds[(seeds["dataset"] == dataset) & (seeds["method"] == method) & (seeds["ratio"] == ratio)]
    return {int(s): float(v) for s, v in zip(part["seed"], part[metric], strict=True)}


def comparisons(seeds: pd.DataFrame, metric: str = "miou", level: float = LEVEL) -> pd.DataFrame:
    """Paired differences (by seed) of every cell against ``random`` at its ratio, ``full`` and ``scratch``.

    Returns:
        rows ``dataset, method, ratio, versus, n, diff_mean, ci_low, ci_high, sentence``
        (differences as fractions; sentences in points), for each reference the sweep has.
    """
    rows = []
    for ds in sorted(seeds["dataset"].unique()):
        part = seeds[seeds["dataset"] == ds]
        cells = sorted({(m, float(r)) for m, r in zip(part["method"], part["ratio"], strict=True)})
        have = set(cells)
        for method, ratio in cells:
            refs = []
            if method not in ("random", "full", SCRATCH) and ("random", ratio) in have:
                refs.append(("random", ratio))
            if method not in ("full", SCRATCH) and ("full", 1.0) in have:
                refs.append(("full", 1.0))
            if method != SCRATCH and (SCRATCH, 0.0) in have:
                refs.append((SCRATCH, 0.0))
            mine = _by_seed(part, ds, method, ratio, metric)
            for ref in refs:
                diff = paired_diff(mine, _by_seed(part, ds, *ref, metric), level)
                sentence = verdict_sentence(
                    display_name(method, ratio), display_name(*ref), diff, unit=METRICS.get(metric, metric), level=level
                )
                rows.append(_comparison_row(ds, method, ratio, ref[0], diff, sentence))
    columns = ["dataset", "method", "ratio", "versus", "n", "diff_mean", "ci_low", "ci_high", "sentence"]
    return pd.DataFrame(rows, columns=columns)


def _comparison_row(ds: str, method: str, ratio: float, versus: str, diff: Interval, sentence: str) -> dict[str, Any]:
    return {
        "dataset": ds,
        "method": method,
        "ratio": ratio,
        "versus": versus,
        "n": diff.n,
        "diff_mean": diff.mean,
        "ci_low": diff.low,
        "ci_high": diff.high,
        "sentence": sentence,
    }


def scratch_verdicts(comps: pd.DataFrame, datasets: list[str]) -> dict[str, dict[str, Any]]:
    """Per dataset: did any pre-training beat fine-tuning from a random encoder beyond the CI?

    Returns:
        ``{dataset: {"status", "beat", "best"}}`` with status ``no_scratch`` (no scratch cell),
        ``no_interval`` (fewer than 2 paired seeds everywhere), ``none_beat`` or ``some_beat``;
        ``beat`` lists the (method, ratio) cells whose interval lies above 0, ``best`` is the
        comparison row with the largest mean difference (None when there is none),
        ``family`` the number of cells compared with scratch and ``beat_corrected`` the cells
        of ``beat`` that still clear 0 after a Bonferroni correction for that family: with
        m cells each tested at 95%, about m / 20 cross by chance alone.
    """
    out: dict[str, dict[str, Any]] = {}
    for ds in datasets:
        part = comps[(comps["dataset"] == ds) & (comps["versus"] == SCRATCH)]
        if part.empty:
            out[ds] = {"status": "no_scratch", "beat": [], "best": None, "family": 0, "beat_corrected": []}
            continue
        best = part.loc[part["diff_mean"].fillna(-math.inf).idxmax()].to_dict()
        beat = [(m, float(r)) for m, r, lo in zip(part["method"], part["ratio"], part["ci_low"], strict=True) if lo > 0]
        family = int(part["ci_low"].notna().sum())
        corrected_level = 1.0 - (1.0 - LEVEL) / max(family, 1)
        beat_corrected = [
            (row.method, float(row.ratio))
            for row in part.itertuples()
            if low_at_level(row.diff_mean, row.ci_low, int(row.n), corrected_level, LEVEL) > 0
        ]
        if beat:
            status = "some_beat"
        elif part["ci_low"].isna().all():
            status = "no_interval"
        else:
            status = "none_beat"
        out[ds] = {"status": status, "beat": beat, "best": best, "family": family, "beat_corrected": beat_corrected}
    return out


def ranking(summary: pd.DataFrame, verdicts: dict[str, dict[str, Any]], dataset: str) -> dict[float, list[str]] | None:
    """Per ratio, the cells that beat scratch, best mean mIoU first; None when nothing may be ranked.

    Cells indistinguishable from no pre-training are not ranked: ordering them would read
    as evidence about selection where there is none. Without a scratch cell every cell is
    ranked (the report says that the baseline is missing).
    """
    verdict = verdicts.get(dataset) or {"status": "no_scratch", "beat": []}
    if verdict["status"] in ("none_beat", "no_interval"):
        return None
    part = summary[(summary["dataset"] == dataset) & (summary["method"] != SCRATCH)]
    allowed = set(verdict["beat"]) if verdict["status"] == "some_beat" else None
    ranks: dict[float, list[str]] = {}
    for ratio, group in part.groupby("ratio", sort=True):
        group = group.sort_values("miou_mean", ascending=False)
        names = [m for m in group["method"] if allowed is None or (m, float(ratio)) in allowed]
        if names:
            ranks[float(ratio)] = names
    return ranks


def overlap_kinds(matches: pd.DataFrame) -> pd.DataFrame:
    """Pool samples per (dataset, kind), each counted once per dataset under its strongest matching kind.

    Shape:
        matches: one row per matched pair (``pool_key, dataset, kind``, ...) -> rows ``dataset, kind, pool_keys``.
    """
    if matches.empty:
        return pd.DataFrame(columns=["dataset", "kind", "pool_keys"])
    rank = matches["kind"].map(KINDS.index)
    strongest = matches.assign(_rank=rank).sort_values("_rank").drop_duplicates(["dataset", "pool_key"])
    counts = strongest.groupby(["dataset", "kind"]).size().rename("pool_keys").reset_index()
    return counts.sort_values(["dataset", "kind"]).reset_index(drop=True)
