"""``report.md`` as a pure function of the report's tables (:mod:`dataeff.report_table`) and loaded units.

The page, top to bottom: the *pre-training vs scratch* box (first, so it cannot be missed),
the demonstration warning, the protocol, the leakage check, per dataset the results with
95% intervals, the papers' claims against full (:mod:`dataeff.report_claims`), the paired
comparisons as sentences, the ranking (only of cells that beat
no pre-training), the per-seed numbers; then the selections, galleries and plots.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pandas as pd

from dataeff.report_claims import claim_lines
from dataeff.report_table import LEVEL, MEAN, display_name, ranking
from dataeff.sweep_layout import REPORT_COMPARISONS_CSV, REPORT_SEEDS_CSV, SCRATCH

# Width and depth of ViT-B/16, the papers' encoder: anything smaller is a demonstration.
_PAPER_DIM, _PAPER_DEPTH = 768, 12
DEMO_NOTE = (
    "**Pipeline demonstration, not a paper reproduction.** These numbers come from tiny, "
    "randomly initialised models trained for a few steps on a small pool{why}. They show that "
    "every stage runs and how the table is built; they say nothing about which selection "
    "method is better."
)
#: What a seed changes, and what it does not (stated in the protocol).
SEED_NOTE = (
    "a seed changes the random subset, the k-means initialisation, the pre-training data order, masks and "
    "initialisation, and the fine-tuning head initialisation and data order; the bootstrap encoder, the pool "
    "embedding and the leakage check are shared by every seed"
)


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None or value is pd.NA:
        return "–"
    if isinstance(value, float):
        return "–" if math.isnan(value) else f"{value:.{digits}f}"
    return str(value)


def _count(value: Any) -> str:
    """A mean count over seeds: an integer when whole, else one decimal."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:.0f}" if float(value).is_integer() else f"{value:.1f}"


def ci_text(mean: float, low: float, high: float, digits: int = 3) -> str:
    """``0.516 [0.502, 0.530]``; ``0.516 (no CI)`` with one seed; ``–`` without a value."""
    if math.isnan(mean):
        return "–"
    if math.isnan(low):
        return f"{mean:.{digits}f} (no CI)"
    return f"{mean:.{digits}f} [{low:.{digits}f}, {high:.{digits}f}]"


def _pct(share: float | None) -> str:
    return "–" if share is None else f"{100 * share:.1f}%"


# --------------------------------------------------------------------------- the box


def scratch_box(verdicts: dict[str, dict[str, Any]], n_seeds: int) -> list[str]:
    """The first thing on the page: did pre-training beat fine-tuning from a random encoder?"""
    pct = f"{LEVEL * 100:g}%"
    lines: list[str] = []
    for ds, v in verdicts.items():
        best = v["best"]
        best_txt = f" Closest: {best['sentence']}." if best else ""
        if v["status"] == "no_scratch":
            lines.append(
                f"**{ds}: pre-training was not compared with no pre-training** (no `scratch` cell in this sweep): "
                "whether any of these methods helps at all is untested. Add `scratch` to `methods`."
            )
        elif v["status"] == "no_interval":
            lines.append(
                f"**{ds}: cannot tell whether pre-training helps** — fewer than 2 seeds paired with `scratch`, "
                f"so there is no interval.{best_txt}"
            )
        elif v["status"] == "none_beat":
            lines.append(
                f"**{ds}: NO pre-training beat training from scratch beyond the {pct} CI** ({n_seeds} seeds, paired "
                f"by seed). Every method, at every ratio, is indistinguishable from (or worse than) a randomly "
                f"initialised encoder, so these results cannot rank selection methods; none is ranked below."
                f"{best_txt}"
            )
        else:
            beat = ", ".join(display_name(m, r) for m, r in v["beat"])
            lines.append(f"**{ds}: pre-training beat training from scratch beyond the {pct} CI** for: {beat}.")
            if v["family"] > 1:
                lines.append(_multiplicity(v, pct))
    if not lines:
        return []
    head = "> ### Does pre-training help at all?"
    return [head, ">", *[x for line in lines for x in (f"> {line}", ">")][:-1], ""]


def _multiplicity(verdict: dict[str, Any], pct: str) -> str:
    """How much the cells that beat scratch weigh against chance: m tests at 95% give ~m/20 false wins."""
    m, n_beat = verdict["family"], len(verdict["beat"])
    head = (
        f"That is {n_beat} of {m} cells compared with scratch, each interval at {pct} on its own: about "
        f"{m / 20:.1f} would cross by chance alone."
    )
    kept = verdict["beat_corrected"]
    if not kept:
        return (
            f"{head} **None still beats scratch after a Bonferroni correction for the {m}**, so this is weak "
            "evidence that pre-training helps here."
        )
    return (
        f"{head} After a Bonferroni correction for the {m}, still ahead: "
        + ", ".join(display_name(a, r) for a, r in kept)
        + "."
    )


# --------------------------------------------------------------------------- sections


def demonstration_reason(units: list[dict[str, Any]]) -> str:
    """Why these results are a demonstration only ('' when models are paper-sized)."""
    why = []
    for unit in units:
        enc = (unit.get("pretrain_config") or {}).get("encoder") or {}
        dim, depth = enc.get("embed_dim"), enc.get("depth")
        if (dim is not None and dim < _PAPER_DIM) or (depth is not None and depth < _PAPER_DEPTH):
            why.append(f"ViT with {depth} blocks x {dim} wide")
        if tiny_sam(unit.get("selection") or {}):
            why.append("OptiDEL patches from a tiny randomly initialised SAM")
    return ", ".join(dict.fromkeys(why))


def tiny_sam(selection: dict[str, Any]) -> bool:
    """OptiDEL ran with the random tiny SAM (summary ``sam_model`` starts with 'tiny')."""
    return str(selection.get("sam_model", "")).startswith("tiny")


def _joined(values: pd.Series, fmt: Any = str) -> str:
    found = sorted({v for v in values if not (isinstance(v, float) and math.isnan(v)) and v != ""})
    return ", ".join(fmt(v) for v in found) or "–"


def protocol_lines(meta: dict[str, Any], seeds: pd.DataFrame, alpha: float) -> list[str]:
    """What was compared and how: budget, images seen, scoring, splits, seeds, intervals, NormDEL."""
    pre = seeds[seeds["method"] != SCRATCH] if len(seeds) else seeds
    budget = _joined(pre["budget"]) if len(pre) else "–"
    if budget == "–":
        budget = str(meta.get("budget") or "steps")
    steps = _joined(pre["pretrain_steps"], lambda v: f"{v:.0f}") if len(pre) else "–"
    epochs = _joined(pre["epochs_seen"], lambda v: f"{v:.3g}") if len(pre) else "–"
    if budget == "epochs":
        budget_txt = (
            f"the same number of epochs over each subset ({meta.get('pretrain_epochs', '–')}; full batches only), "
            f"so a smaller subset gets fewer optimiser steps ({steps} steps)"
        )
    else:
        budget_txt = (
            f"the same number of optimiser steps for every cell ({steps} steps), so a smaller subset is seen "
            f"for more epochs (epochs seen: {epochs})"
        )
    scoring = _joined(seeds["scoring"]) if len(seeds) else "–"
    scoring_txt = {
        "native": "test masks scored at their native resolution (predictions resized back)",
        "–": "results.json does not record the scoring resolution (older fine-tuning: scored at data.image_size)",
    }.get(scoring, scoring)
    has_img = len(seeds) and seeds["dice_img"].notna().any()
    level = f"{LEVEL * 100:g}%"
    # The seeds found on disk, not sweep.json's list: a partly finished or extended sweep is reported as it is.
    seed_list = sorted({int(s) for s in seeds["seed"]}) if len(seeds) else []
    lines = [
        "## Protocol",
        "",
        f"- Pre-training budget: {budget_txt}. Images seen per cell: column *images seen* below.",
        f"- Scoring: {scoring_txt}. Dataset-level mIoU and Dice come from one confusion matrix over all test "
        "pixels (mIoU over {background, foreground}); "
        + (
            "per-image Dice is the mean over test images of each image's Dice."
            if has_img
            else "per-image scores: – (not in these results.json)."
        ),
        f"- Splits (the same for every method and seed: from the dataset's split.json or data.seed, never "
        f"the run seed): {_split_text(seeds)}.",
        *_low_label_lines(seeds),
        f"- Seeds: {', '.join(map(str, seed_list)) or '–'} per cell; {SEED_NOTE} (seed {meta.get('shared_seed', 0)}).",
        f"- Uncertainty: mean and {level} Student-t interval over seeds, mean ± t(0.975, n−1)·s/√n "
        "(`dataeff.stats.mean_ci`; t = 4.30 for 3 seeds). Comparisons pair the runs by seed and give the "
        "t-interval of the per-seed differences; *not distinguishable* means the interval contains 0.",
        f"- NormDEL = 1 / (1 + exp(−mIoU · exp(−{alpha:g} · R))), R = the real kept fraction of the pool "
        "(not defined for scratch, which uses no pre-training data), mIoU a fraction; per seed, then mean and interval.",
        "- `full` runs at ratio 1.0 only; `random` at 1.0 would repeat it and is skipped. `scratch` fine-tunes "
        "a randomly initialised encoder of the pre-trained encoders' shape with the same recipe.",
    ]
    for skipped in meta.get("skipped", []):
        lines.append(f"- Skipped {skipped['cell']}: {skipped['why']}")
    return [*lines, ""]


def _low_label_lines(seeds: pd.DataFrame) -> list[str]:
    """Protocol lines for a low-label draw (data.n_train) and a frozen-encoder evaluation, when the runs used them."""
    lines = []
    if len(seeds) and seeds["label_draw"].any():
        lines.append(
            f"- Labels: each run fine-tunes on a draw of {_joined(seeds['n_train'], lambda v: f'{v:.0f}')} labelled "
            "training pairs from the train split (`data.n_train`), drawn by the run seed: every cell of a seed "
            "trains on the same pairs, so paired comparisons compare the same labels; seeds differ in their draw."
        )
    if len(seeds) and seeds["encoder_frozen"].any():
        frozen = _joined(seeds.loc[seeds["encoder_frozen"].astype(bool), "dataset"])
        lines.append(
            f"- Evaluation on {frozen}: frozen encoder (`freeze_encoder`): only the segmentation head is trained, "
            "so the scores measure the pre-trained features themselves."
        )
    return lines


def _split_text(seeds: pd.DataFrame) -> str:
    parts = []
    for ds, part in seeds[seeds["dataset"] != MEAN].groupby("dataset", sort=True):
        counts = {tuple(x) for x in part[["n_train", "n_val", "n_test"]].dropna().to_numpy()}
        if not counts:
            parts.append(f"{ds}: –")
        elif len(counts) == 1:
            tr, va, te = next(iter(counts))
            parts.append(f"{ds}: train {tr:.0f} / val {va:.0f} / test {te:.0f}")
        else:
            parts.append(f"{ds}: **split sizes differ between runs** ({len(counts)} variants)")
    return "; ".join(parts) or "–"


def overlap_lines(
    overlap: dict[str, Any] | None, kinds: pd.DataFrame, dropped: dict[str, int], sheet: str | None
) -> list[str]:
    """The leakage check: matched pool samples per dataset and kind, and whether selection removed them.

    Args:
        overlap: the overlap ``summary.json`` (None when the sweep ran without the check).
        kinds: ``dataset, kind, pool_keys`` (pool samples whose strongest match in that dataset is that kind).
        dropped: per selection cell name, its count of reason ``downstream_overlap``.
        sheet: the contact sheet's link, relative to the report.
    """
    lines = ["## Leakage check (pool vs downstream)", ""]
    if overlap is None:
        return [*lines, "Not run (`overlap.enabled=false`, or a sweep from before the check): pool samples that "
                "copy a downstream image may have been pre-trained on.", ""]  # fmt: skip
    total = overlap.get("excluded_pool_keys", 0)
    signals = ", ".join(overlap.get("inputs", {}).get("signals", [])) or "–"
    lines.append(f"Signals: {signals}. Pool samples matching a downstream image: **{total}** (all datasets).")
    lines += [
        "",
        "| dataset | downstream files matched | pool samples | exact | phash | embedding |",
        "|---|---|---|---|---|---|",
    ]
    for ds, c in sorted((overlap.get("counts") or {}).items()):
        sub = kinds[kinds["dataset"] == ds] if len(kinds) else pd.DataFrame(columns=["kind", "pool_keys"])
        per = {str(k): int(n) for k, n in zip(sub["kind"], sub["pool_keys"], strict=True)}
        lines.append(
            f"| {ds} | {c.get('files', 0)} | {c.get('pool_keys', 0)} | {per.get('exact', 0)} | "
            f"{per.get('phash', 0)} | {per.get('embedding', 0)} |"
        )
    lines.append("")
    lines.append("(kind columns: pool samples by the strongest signal that matched them)")
    if dropped:
        counts = sorted(set(dropped.values()))
        txt = ", ".join(map(str, counts))
        lines.append(
            f"Every selection removed them before choosing (reason `downstream_overlap`: {txt} per selection)."
        )
    elif total:
        lines.append(
            "**The selections do not record `downstream_overlap` drops: these pool samples were NOT removed** "
            "(the select stage of this run had no `exclude`)."
        )
    if sheet:
        lines.append(f"Contact sheet of the matched pairs: [{sheet}]({sheet})")
    return [*lines, ""]


def results_lines(summary: pd.DataFrame, dataset: str) -> list[str]:
    """Per-dataset table: each cell's mean and 95% interval over seeds."""
    part = summary[summary["dataset"] == dataset]
    has_img = part["dice_img_mean"].notna().any()
    head = ["method", "ratio", "R (real)", "kept", "images seen", "seeds", "mIoU", "Dice"]
    head += ["per-image Dice"] if has_img else []
    head += ["NormDEL", "pretrain h", "device"]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for _, r in part.iterrows():
        scratch = r["method"] == SCRATCH
        r_txt = _fmt(r["kept_fraction"], 3)
        if r["off_nominal"]:
            r_txt = f"**{r_txt}** (nominal {r['ratio']:g})"
        vals = [
            r["method"] + ("" if r["done"] else " (unfinished)"),
            "–" if scratch else f"{r['ratio']:g}",
            r_txt,
            _count(r["kept"]),
            _count(r["images_seen"]),
            str(r["n_seeds"]),
            ci_text(r["miou_mean"], r["miou_ci_low"], r["miou_ci_high"]),
            ci_text(r["dice_mean"], r["dice_ci_low"], r["dice_ci_high"]),
        ]
        if has_img:
            vals.append(ci_text(r["dice_img_mean"], r["dice_img_ci_low"], r["dice_img_ci_high"]))
        vals += [
            ci_text(r["normdel_mean"], r["normdel_ci_low"], r["normdel_ci_high"]),
            _fmt(r["pretrain_hours"], 4),
            r["device"] or "–",
        ]
        out.append("| " + " | ".join(vals) + " |")
    return [*out, ""]


def comparison_lines(comps: pd.DataFrame, dataset: str) -> list[str]:
    """One sentence per paired comparison, grouped by ratio (vs random, vs full, vs scratch)."""
    part = comps[comps["dataset"] == dataset]
    if part.empty:
        return ["No comparisons (one cell only).", ""]
    out = []
    for ratio, group in part.groupby("ratio", sort=True):
        out.append(f"- **ratio {ratio:g}**" if ratio > 0 else "- **scratch**")
        for sentence in group["sentence"]:
            out.append(f"  - {sentence}")
    return [*out, ""]


def ranking_lines(summary: pd.DataFrame, verdicts: dict[str, dict[str, Any]], dataset: str) -> list[str]:
    ranks = ranking(summary, verdicts, dataset)
    if ranks is None:
        return [
            "Not ranked: no pre-trained cell beat scratch (no pre-training) beyond the CI, so any order would be noise.",
            "",
        ]
    if not ranks:
        return ["Nothing to rank.", ""]
    note = "" if verdicts.get(dataset, {}).get("status") == "some_beat" else " (no scratch baseline: unchecked)"
    out = [f"By mean mIoU, only cells that beat scratch beyond the CI{note}:"]
    out += [f"- {ratio:g}: " + " > ".join(names) for ratio, names in ranks.items()]
    return [*out, ""]


def per_seed_lines(seeds: pd.DataFrame, dataset: str) -> list[str]:
    """mIoU of every (cell, seed), so a reader sees the spread behind each interval."""
    part = seeds[seeds["dataset"] == dataset]
    seed_ids = sorted({int(s) for s in part["seed"]})
    head = ["cell", *[f"seed {s}" for s in seed_ids]]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for (method, ratio), group in part.groupby(["method", "ratio"], sort=True):
        by = {int(s): v for s, v in zip(group["seed"], group["miou"], strict=True)}
        name = SCRATCH if method == SCRATCH else f"{method} {ratio:g}"
        out.append("| " + " | ".join([name, *[_fmt(by.get(s, math.nan), 4) for s in seed_ids]]) + " |")
    return [*out, ""]


def _reasons(counts: dict[str, int]) -> str:
    """Counts by reason, with ``redundant_of:<key>`` folded into ``redundant``."""
    folded: dict[str, int] = {}
    for reason, n in counts.items():
        key = "redundant" if reason.startswith("redundant_of:") else reason
        folded[key] = folded.get(key, 0) + int(n)
    return ", ".join(f"{k} {v}" for k, v in sorted(folded.items())) or "–"


def selection_lines(units: list[dict[str, Any]]) -> list[str]:
    """Markdown table of what each selection kept and dropped, with audit and OptiDEL scores."""
    lines = [
        "| cell / seed | kept / pool | R | counts by reason | audit of drops: precision / recall | "
        "kept originals: invalid / excess near-duplicates (pool) | OptiDEL |",
        "|---|---|---|---|---|---|---|",
    ]
    for unit in sorted(units, key=lambda c: (c["method"], float(c["ratio"]), int(c.get("seed", 0)))):
        sel = unit.get("selection")
        if not sel:
            continue
        audit = sel.get("audit") or {}
        audit_txt = kept_txt = "–"
        if audit and audit.get("dropped", 1):  # methods that drop without reasons (random, OptiDEL): nothing to score
            audit_txt = f"{_fmt(audit.get('precision'), 2)} / {_fmt(audit.get('recall'), 2)}"
            per_cat = audit.get("per_category") or {}
            recalls = [f"{cat} {_fmt(v.get('recall'), 2)}" for cat, v in sorted(per_cat.items())]
            if recalls:
                audit_txt += f" (recall: {', '.join(recalls)})"
        kept, pool = audit.get("kept") or {}, audit.get("pool") or {}
        if kept.get("samples"):
            kept_txt = (
                f"{_pct(kept['invalid_share'])} / {_pct(kept['excess_duplicate_share'])} "
                f"({_pct(pool.get('invalid_share'))} / {_pct(pool.get('excess_duplicate_share'))})"
            )
        opti = "–"
        if "mean_hardness_selected" in sel:
            opti = (
                f"hardness {_fmt(sel['mean_hardness_selected'], 3)} selected vs "
                f"{_fmt(sel.get('mean_hardness_all', math.nan), 3)} all; cluster coverage "
                f"{_fmt(sel.get('cluster_coverage', math.nan), 2)}"
            )
            if tiny_sam(sel):
                opti += "; **tiny random-init SAM (demo)**"
        lines.append(
            f"| {unit['cell']} / {unit.get('seed', 0)} | {sel.get('kept', '–')} / {sel.get('pool_size', '–')} | "
            f"{_fmt(sel.get('kept_fraction', math.nan), 3)} | {_reasons(sel.get('counts_by_reason') or {})} | "
            f"{audit_txt} | {kept_txt} | {opti} |"
        )
    return lines


def markdown_report(
    summary: pd.DataFrame,
    seeds: pd.DataFrame,
    comps: pd.DataFrame,
    verdicts: dict[str, dict[str, Any]],
    units: list[dict[str, Any]],
    meta: dict[str, Any],
    alpha: float,
    extras: dict[str, Any],
) -> str:
    """The whole ``report.md`` page.

    Args:
        extras: file-derived pieces the shell found: ``overlap`` (summary or None),
            ``overlap_kinds`` (DataFrame), ``overlap_dropped`` ({cell: n}), ``overlap_sheet``,
            ``galleries`` ([(unit name, [links])]), ``plots`` ([links]).
    """
    name = meta.get("name") or "sweep"
    n_seeds = int(summary["n_seeds"].max()) if len(summary) else 0
    out = [f"# dataeff sweep report: {name}", ""]
    out += scratch_box(verdicts, n_seeds)
    why = demonstration_reason(units)
    if why:
        out += ["> " + DEMO_NOTE.format(why=f" ({why})"), ""]
    out += protocol_lines(meta, seeds, alpha)
    out += overlap_lines(
        extras.get("overlap"), extras.get("overlap_kinds", pd.DataFrame()), extras.get("overlap_dropped", {}),
        extras.get("overlap_sheet"),
    )  # fmt: skip
    datasets = sorted(summary["dataset"].unique(), key=lambda d: (d == MEAN, d)) if len(summary) else []
    for ds in datasets:
        title = "mean over downstream datasets" if ds == MEAN else ds
        out += [f"## Results: {title}", ""]
        out += results_lines(summary, ds)
        out += [f"### The papers' questions (paired with full by seed, {LEVEL * 100:g}% CI, mIoU points)", ""]
        out += claim_lines(comps, ds)
        out += [f"### Paired comparisons ({LEVEL * 100:g}% CI, paired by seed, mIoU points)", ""]
        out += comparison_lines(comps, ds)
        out += ["### Ranking", ""] + ranking_lines(summary, verdicts, ds)
        out += ["### Per seed (mIoU)", ""] + per_seed_lines(seeds, ds)
    out += [f"Tables: [report.csv](report.csv) (per cell), [{REPORT_SEEDS_CSV}]({REPORT_SEEDS_CSV}) (per seed), "
            f"[{REPORT_COMPARISONS_CSV}]({REPORT_COMPARISONS_CSV}) (paired comparisons).", ""]  # fmt: skip
    out += ["## Selections", "", *selection_lines(units), ""]
    galleries = extras.get("galleries") or []
    if galleries:
        out += ["## Galleries", ""]
        out += [f"- {unit}: " + ", ".join(f"[{Path(p).name}]({p})" for p in links) for unit, links in galleries]
        out.append("")
    plots = extras.get("plots") or []
    if plots:
        out += ["## Plots", "", "Error bars and bands: 95% t-intervals over seeds.", ""]
        out += [f"![{Path(p).stem}]({p})" for p in plots] + [""]
    return "\n".join(out)
