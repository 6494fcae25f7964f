"""The report's figures: mIoU against the kept ratio and NormDEL per ratio, with 95% intervals over seeds.

Each function draws one PNG from a :func:`dataeff.report_table.summary_table` (one row per
(method, ratio, dataset)); matplotlib is imported inside, with the Agg backend, so the
report's pure parts load without it.
"""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

from dataeff.report_table import off_nominal
from dataeff.sweep_layout import SCRATCH

# One colour per method in every plot, so figures compare at a glance.
_COLORS = {
    "full": "#444444",
    "random": "#1f77b4",
    "meddel": "#ff7f0e",
    "optidel": "#2ca02c",
    "semdedup": "#9467bd",
    SCRATCH: "#d62728",
}


def _color(method: str) -> str:
    extra = ["#8c564b", "#e377c2", "#17becf", "#bcbd22"]
    return _COLORS.get(method, extra[sum(map(ord, method)) % len(extra)])


def _yerr(part: pd.DataFrame, metric: str, scale: float) -> list[list[float]]:
    """Asymmetric error bars from the CI columns (0 where a cell has one seed: no interval)."""
    mean = part[f"{metric}_mean"]
    low = (mean - part[f"{metric}_ci_low"]).fillna(0.0) * scale
    high = (part[f"{metric}_ci_high"] - mean).fillna(0.0) * scale
    return [list(low), list(high)]


def _band(ax: object, row: pd.Series, metric: str, scale: float, color: str, style: str, label: str) -> None:
    """A reference cell (full, scratch) as a horizontal line with its CI shaded across the plot."""
    mean = row[f"{metric}_mean"] * scale
    ax.axhline(mean, color=color, ls=style, lw=1.2, label=label)  # type: ignore[attr-defined]
    if not math.isnan(row[f"{metric}_ci_low"]):
        lo, hi = row[f"{metric}_ci_low"] * scale, row[f"{metric}_ci_high"] * scale
        ax.axhspan(lo, hi, color=color, alpha=0.12, lw=0)  # type: ignore[attr-defined]


def plot_miou(summary: pd.DataFrame, title: str, path: Path) -> None:
    """mIoU (%) against the kept fraction, one line per method with 95% CI error bars (the papers' Figure 6 shape).

    ``full`` and ``scratch`` are horizontal reference lines with shaded intervals. A point
    sits at the cell's *real* kept fraction; when that differs from the nominal ratio the
    point is labelled ``R=<real> (nominal <ratio>)``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=110)
    ratios = sorted(r for r in summary["ratio"].unique() if r > 0)
    for method, part in summary.groupby("method", sort=True):
        part = part.dropna(subset=["miou_mean"]).sort_values("ratio")
        if part.empty:
            continue
        n = int(part["n_seeds"].max())
        if method in ("full", SCRATCH):
            style = "--" if method == "full" else ":"
            label = "full (100%)" if method == "full" else "scratch (no pre-training)"
            _band(ax, part.iloc[-1], "miou", 100, _color(method), style, f"{label}, n={n}")
            if method == "full":
                ax.plot([100.0], [100 * part["miou_mean"].iloc[-1]], "*", color=_color(method), ms=10)
            continue
        x = [100 * (k if not math.isnan(k) else r) for k, r in zip(part["kept_fraction"], part["ratio"], strict=True)]
        ax.errorbar(
            x,
            100 * part["miou_mean"],
            yerr=_yerr(part, "miou", 100),
            fmt="o-",
            color=_color(method),
            capsize=3,
            label=f"{method}, n={n}",
        )
        for xi, (_, row) in zip(x, part.iterrows(), strict=True):
            if off_nominal(row["ratio"], row["kept_fraction"]):
                ax.annotate(
                    f"R={row['kept_fraction']:.3g} (nominal {row['ratio']:g})",
                    (xi, 100 * row["miou_mean"]),
                    textcoords="offset points",
                    xytext=(4, -12),
                    fontsize=7,
                    color=_color(method),
                )
    if ratios:
        ax.set_xscale("log")
        ticks = sorted({*ratios, 1.0})
        ax.set_xticks([100 * r for r in ticks], [f"{100 * r:g}%" for r in ticks])
        ax.minorticks_off()
    ax.set_xlabel("pre-training data kept (real fraction R)")
    ax.set_ylabel("mIoU (%), mean and 95% CI over seeds")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_normdel(summary: pd.DataFrame, title: str, path: Path) -> None:
    """NormDEL per method with 95% CI error bars: bars grouped by nominal ratio (scratch at R = 0)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ratios = sorted(summary["ratio"].unique())
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=110)
    labelled: set[str] = set()
    for j, ratio in enumerate(ratios):
        part = summary[(summary["ratio"] == ratio) & summary["normdel_mean"].notna()].sort_values("method")
        width = 0.8 / max(len(part), 1)
        for i, (_, r) in enumerate(part.iterrows()):
            x = j + (i - (len(part) - 1) / 2) * width
            label = None if r["method"] in labelled else r["method"]
            labelled.add(r["method"])
            err = _yerr(part.iloc[[i]], "normdel", 1.0)
            ax.bar(x, r["normdel_mean"], width=width * 0.95, color=_color(r["method"]), label=label)
            ax.errorbar([x], [r["normdel_mean"]], yerr=err, fmt="none", ecolor="black", capsize=2, lw=0.8)
            ax.annotate(f"{r['normdel_mean']:.3f}", (x, r["normdel_mean"]), ha="center", va="bottom", fontsize=6)
    names = ["scratch (R=0)" if r == 0 else f"{100 * r:g}%" for r in ratios]
    ax.set_xticks(range(len(ratios)), names)
    finite = pd.concat([summary["normdel_ci_low"], summary["normdel_mean"]]).dropna()
    if len(finite):
        top = pd.concat([summary["normdel_ci_high"], summary["normdel_mean"]]).dropna().max()
        ax.set_ylim(max(0.0, finite.min() - 0.05), min(1.0, top + 0.05))
    ax.set_xlabel("pre-training data kept (nominal ratio)")
    ax.set_ylabel("NormDEL, mean and 95% CI over seeds")
    ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
