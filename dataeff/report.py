"""``dataeff report run=runs/<sweep>``: one table, two plots and a markdown page per sweep.

Reads only what the stages wrote under ``<run>/cells/<method>-r<ratio>/`` (``cell.json``,
``selection/summary.json``, ``pretrain/summary.json``, ``finetune/<dataset>/results.json``)
and writes ``report.csv``, ``report.md`` and ``plots/*.png`` into ``<run>``. The core
(``cell_row``, ``build_table``, ``markdown_report``) is pure; ``load_cells`` and ``main``
are the file-reading shell.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from dataeff.config import ConfigError, WandbConfig, option, section
from dataeff.constants import CELL_NAME, RESULTS_NAME, SUMMARY_NAME
from dataeff.files import save_resolved, write_atomic
from dataeff.metrics import del_score, normdel

log = logging.getLogger("dataeff")

# Width and depth of ViT-B/16, the papers' encoder: anything smaller is a demonstration.
_PAPER_DIM, _PAPER_DEPTH = 768, 12
DEMO_NOTE = (
    "**Pipeline demonstration, not a paper reproduction.** These numbers come from tiny, "
    "randomly initialised models trained for a few steps on a small pool{why}. They show that "
    "every stage runs and how the table is built; they say nothing about which selection "
    "method is better."
)


@dataclass
class ReportConfig:
    """Tabulate a finished (or partly finished) sweep."""

    run: str = option("", help="sweep output directory (the one holding cells/)")
    alpha: float = option(1.0, help="NormDEL alpha: DEL = mIoU * exp(-alpha * R) (benchmark: 1.0)")
    plots: bool = option(True, help="write plots/miou_<dataset>.png and plots/normdel.png")
    wandb: WandbConfig = section(WandbConfig, help="log the table and plots as a 'report' job of the sweep's group")

    def __post_init__(self) -> None:
        if not self.run:
            raise ConfigError("run is empty: give the sweep directory, e.g. 'dataeff report run=runs/demo'")
        if self.alpha < 0:
            raise ConfigError(f"alpha={self.alpha}: must be >= 0")


# --------------------------------------------------------------------------- pure core


def _num(value: Any) -> float:
    """A JSON number as float; None (how results.json stores NaN) and missing -> NaN."""
    return math.nan if value is None else float(value)


def _mean(values: list[float]) -> float:
    values = [v for v in values if v is not None and not math.isnan(v)]
    return sum(values) / len(values) if values else math.nan


def cell_row(cell: dict[str, Any], alpha: float) -> dict[str, Any]:
    """One report row from a loaded cell (see ``load_cell``).

    mIoU is a fraction, averaged over the cell's downstream datasets; NormDEL uses the
    selection's ``kept_fraction`` as R (PAPERS.md, NormDEL). A cell without results
    for some dataset gets NaN there and in the means.
    """
    sel = cell.get("selection") or {}
    pre = cell.get("pretrain") or {}
    results = cell.get("finetune") or {}
    datasets = cell.get("datasets") or sorted(results)
    row: dict[str, Any] = {
        "method": cell["method"],
        "ratio": float(cell["ratio"]),
        "kept": _num(sel.get("kept")),
        "pool_size": _num(sel.get("pool_size")),
        "kept_fraction": _num(sel.get("kept_fraction")),
        "images_seen": _num(pre.get("images_seen")),
        "pretrain_steps": _num(pre.get("steps")),
        "pretrain_hours": _device_hours(pre),
        "device": _device_label(pre),
        "cell_wall_s": sum(s.get("wall_s", 0.0) for s in (cell.get("stages") or {}).values()),
    }
    for ds in datasets:
        res = results.get(ds) or {}
        row[f"miou_{ds}"] = _num(res.get("miou"))
        row[f"dice_{ds}"] = _num(res.get("dice"))
    row["miou"] = _mean([row[f"miou_{ds}"] for ds in datasets])
    row["dice"] = _mean([row[f"dice_{ds}"] for ds in datasets])
    r = row["kept_fraction"]
    ok = not (math.isnan(row["miou"]) or math.isnan(r))
    row["del"] = del_score(row["miou"], r, alpha) if ok else math.nan
    row["normdel"] = normdel(row["miou"], r, alpha) if ok else math.nan
    row["done"] = bool(cell.get("done", False))
    return row


def _device_hours(pre: dict[str, Any]) -> float:
    """Device-hours of pre-training: wall time times the number of devices (ranks)."""
    wall = pre.get("wall_time_s", pre.get("wall_s"))
    if wall is None:
        return math.nan
    return float(wall) * int(pre.get("world_size", 1)) / 3600.0


def _device_label(pre: dict[str, Any]) -> str:
    """What pretrain ran on, e.g. '2 x cpu' or '8 x NVIDIA H100'."""
    return str(pre.get("device", "")) if pre else ""


def build_table(cells: list[dict[str, Any]], alpha: float) -> pd.DataFrame:
    """Rows = (method, ratio) cells sorted by method then ratio; columns as in ``cell_row``."""
    rows = [cell_row(c, alpha) for c in cells]
    if not rows:
        return pd.DataFrame(columns=["method", "ratio", "kept", "miou", "normdel"])
    df = pd.DataFrame(rows)
    # Per-dataset columns of different cells may differ; keep them grouped after the fixed ones.
    fixed = [c for c in rows[0] if not c.startswith(("miou_", "dice_"))]
    per_ds = sorted(
        {c for r in rows for c in r if c.startswith(("miou_", "dice_"))}, key=lambda c: (c[5:], c[:4] != "miou")
    )
    order = fixed[: fixed.index("cell_wall_s") + 1] + per_ds + fixed[fixed.index("cell_wall_s") + 1 :]
    df = df[order].sort_values(["method", "ratio"], kind="stable").reset_index(drop=True)
    for col in ("kept", "pool_size", "images_seen", "pretrain_steps"):
        df[col] = df[col].astype("Int64")  # counts stay integers in the CSV; missing = empty
    return df


def datasets_of(df: pd.DataFrame) -> list[str]:
    return [c[len("miou_") :] for c in df.columns if c.startswith("miou_")]


def demonstration_reason(cells: list[dict[str, Any]]) -> str:
    """Why these results are a demonstration only ('' when models are paper-sized)."""
    why = []
    for cell in cells:
        enc = (cell.get("pretrain_config") or {}).get("encoder") or {}
        dim, depth = enc.get("embed_dim"), enc.get("depth")
        if (dim is not None and dim < _PAPER_DIM) or (depth is not None and depth < _PAPER_DEPTH):
            why.append(f"ViT with {depth} blocks x {dim} wide")
        if _tiny_sam(cell.get("selection") or {}):
            why.append("OptiDEL patches from a tiny randomly initialised SAM")
    return ", ".join(dict.fromkeys(why))


def _tiny_sam(selection: dict[str, Any]) -> bool:
    """OptiDEL ran with the random tiny SAM (summary ``sam_model`` starts with 'tiny')."""
    return str(selection.get("sam_model", "")).startswith("tiny")


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None or value is pd.NA:
        return "–"
    if isinstance(value, float):
        return "–" if math.isnan(value) else f"{value:.{digits}f}"
    return str(value)


def _pct(share: float | None) -> str:
    return "–" if share is None else f"{100 * share:.1f}%"


def _reasons(counts: dict[str, int]) -> str:
    """Counts by reason, with ``redundant_of:<key>`` folded into ``redundant``."""
    folded: dict[str, int] = {}
    for reason, n in counts.items():
        key = "redundant" if reason.startswith("redundant_of:") else reason
        folded[key] = folded.get(key, 0) + int(n)
    return ", ".join(f"{k} {v}" for k, v in sorted(folded.items())) or "–"


def selection_lines(cells: list[dict[str, Any]]) -> list[str]:
    """Markdown table of what each selection kept and dropped, with audit and OptiDEL scores."""
    lines = [
        "| cell | kept / pool | R | counts by reason | audit of drops: precision / recall | "
        "kept originals: invalid / excess near-duplicates (pool) | OptiDEL |",
        "|---|---|---|---|---|---|---|",
    ]
    for cell in sorted(cells, key=lambda c: (c["method"], float(c["ratio"]))):
        sel = cell.get("selection") or {}
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
            if _tiny_sam(sel):
                opti += "; **tiny random-init SAM (demo)**"
        lines.append(
            f"| {cell['cell']} | {sel.get('kept', '–')} / {sel.get('pool_size', '–')} | "
            f"{_fmt(sel.get('kept_fraction', math.nan), 3)} | {_reasons(sel.get('counts_by_reason') or {})} | "
            f"{audit_txt} | {kept_txt} | {opti} |"
        )
    return lines


def markdown_report(
    df: pd.DataFrame, cells: list[dict[str, Any]], meta: dict[str, Any], alpha: float, plots: list[str]
) -> str:
    """The whole ``report.md`` page."""
    name = meta.get("name") or "sweep"
    out = [f"# dataeff sweep report: {name}", ""]
    why = demonstration_reason(cells)
    if why:
        out += ["> " + DEMO_NOTE.format(why=f" ({why})"), ""]
    steps = sorted({int(s) for s in df["pretrain_steps"].dropna()}) if len(df) else []
    seen = sorted({int(s) for s in df["images_seen"].dropna()}) if len(df) else []
    out += [
        "## Protocol",
        "",
        f"- Pre-training budget: the same number of optimiser steps for every cell "
        f"({', '.join(map(str, steps)) or '–'} steps; images seen per cell: {', '.join(map(str, seen)) or '–'}), "
        "so a smaller subset is seen for more epochs.",
        "- `full` runs at ratio 1.0 only; `random` at 1.0 would repeat it and is skipped.",
        f"- NormDEL = 1 / (1 + exp(-mIoU · exp(-{alpha:g} · R))), R = kept fraction of the pool, "
        "mIoU a fraction averaged over the downstream datasets.",
    ]
    if meta.get("seed") is not None:
        out.append(f"- Seed {meta['seed']} for every stage of every cell.")
    for skipped in meta.get("skipped", []):
        out.append(f"- Skipped {skipped['cell']}: {skipped['why']}")
    out += ["", "## Results", ""]
    datasets = datasets_of(df)
    head = ["method", "ratio", "kept", "images seen", "pretrain h", "device"]
    head += [f"mIoU {d}" for d in datasets] + [f"Dice {d}" for d in datasets] + ["mean mIoU", "NormDEL"]
    out += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for _, r in df.iterrows():
        vals = [
            r["method"],
            f"{r['ratio']:g}",
            _fmt(r["kept"]),
            _fmt(r["images_seen"]),
            _fmt(r["pretrain_hours"], 4),
            r["device"],
        ]
        vals += [_fmt(r[f"miou_{d}"]) for d in datasets] + [_fmt(r[f"dice_{d}"]) for d in datasets]
        vals += [_fmt(r["miou"]), _fmt(r["normdel"])]
        if not r["done"]:
            vals[0] += " (unfinished)"
        out.append("| " + " | ".join(map(str, vals)) + " |")
    out += ["", "## Selections", ""] + selection_lines(cells) + [""]
    if plots:
        out += ["## Plots", ""] + [f"![{Path(p).stem}]({p})" for p in plots] + [""]
    return "\n".join(out)


# --------------------------------------------------------------------------- plots


# One colour per method in every plot, so figures compare at a glance.
_COLORS = {"full": "#444444", "random": "#1f77b4", "meddel": "#ff7f0e", "optidel": "#2ca02c", "semdedup": "#9467bd"}


def _color(method: str) -> str:
    extra = ["#8c564b", "#e377c2", "#17becf", "#bcbd22"]
    return _COLORS.get(method, extra[sum(map(ord, method)) % len(extra)])


def plot_miou(df: pd.DataFrame, column: str, title: str, path: Path) -> None:
    """mIoU (%) against the kept ratio, one line per method (the papers' Figure 6 shape).

    ``full`` is a single point at 100 %, drawn as a dashed reference line across ratios.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=110)
    ratios = sorted(df["ratio"].unique())
    for method, part in df.groupby("method", sort=True):
        part = part.dropna(subset=[column]).sort_values("ratio")
        if part.empty:
            continue
        if method == "full":
            ax.axhline(100 * part[column].iloc[-1], color=_color(method), ls="--", lw=1)
            ax.plot(100 * part["ratio"], 100 * part[column], "*", color=_color(method), ms=10, label="full (100%)")
        else:
            ax.plot(100 * part["ratio"], 100 * part[column], "o-", color=_color(method), label=method)
    ax.set_xscale("log")
    ax.set_xticks([100 * r for r in ratios], [f"{100 * r:g}%" for r in ratios])
    ax.minorticks_off()
    ax.set_xlabel("pre-training data kept (ratio)")
    ax.set_ylabel("mIoU (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_normdel(df: pd.DataFrame, path: Path) -> None:
    """NormDEL per method: bars grouped by ratio, each group holding the methods run at it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ratios = sorted(df["ratio"].unique())
    fig, ax = plt.subplots(figsize=(6, 4), dpi=110)
    labelled: set[str] = set()
    for j, ratio in enumerate(ratios):
        part = df[(df["ratio"] == ratio) & df["normdel"].notna()].sort_values("method")
        width = 0.8 / max(len(part), 1)
        for i, (_, r) in enumerate(part.iterrows()):
            x = j + (i - (len(part) - 1) / 2) * width
            label = None if r["method"] in labelled else r["method"]
            labelled.add(r["method"])
            ax.bar(x, r["normdel"], width=width * 0.95, color=_color(r["method"]), label=label)
            ax.annotate(f"{r['normdel']:.3f}", (x, r["normdel"]), ha="center", va="bottom", fontsize=7)
    ax.set_xticks(range(len(ratios)), [f"{100 * r:g}%" for r in ratios])
    finite = df["normdel"].dropna()
    if len(finite):
        ax.set_ylim(max(0.0, finite.min() - 0.05), min(1.0, finite.max() + 0.05))
    ax.set_xlabel("pre-training data kept (ratio)")
    ax.set_ylabel("NormDEL")
    ax.set_title("NormDEL per method (higher = more data-effective)")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# --------------------------------------------------------------------------- shell


def _read_json(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.is_file() else None


def _read_yaml(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.load(path), resolve=True)  # type: ignore[return-value]


def load_cell(cell_dir: Path) -> dict[str, Any] | None:
    """Everything the report needs from one cell directory (None if it is not a cell yet)."""
    info = _read_json(cell_dir / CELL_NAME)
    selection = _read_json(cell_dir / "selection" / SUMMARY_NAME)
    if info is None and selection is None:
        return None
    info = dict(info or {})
    info.setdefault("method", (selection or {}).get("method"))
    info.setdefault("ratio", (selection or {}).get("ratio"))
    info.setdefault("cell", cell_dir.name)
    finetune = {}
    ft_root = cell_dir / "finetune"
    names = info.get("datasets") or (
        sorted(p.name for p in ft_root.iterdir() if p.is_dir()) if ft_root.is_dir() else []
    )
    for name in names:
        res = _read_json(ft_root / name / RESULTS_NAME)
        if res is not None:
            finetune[name] = res
    info["datasets"] = list(names)
    info["selection"] = selection
    info["pretrain"] = _read_json(cell_dir / "pretrain" / SUMMARY_NAME)
    info["pretrain_config"] = _read_yaml(cell_dir / "pretrain" / "config.yaml")
    info["finetune"] = finetune
    return info


def load_cells(run: Path) -> list[dict[str, Any]]:
    cells_root = run / "cells"
    if not cells_root.is_dir():
        raise ConfigError(f"run={run}: no cells/ directory; is this the out= of a 'dataeff sweep'?")
    cells = [c for c in (load_cell(d) for d in sorted(cells_root.iterdir()) if d.is_dir()) if c]
    if not cells:
        raise ConfigError(f"run={run}: cells/ holds no cell yet; run 'dataeff sweep' first")
    return cells


def write_plots(df: pd.DataFrame, run: Path) -> list[str]:
    """PNGs under ``<run>/plots``; returns their paths relative to ``run``."""
    plot_dir = run / "plots"
    plot_dir.mkdir(parents=True, exist_ok=True)
    made = []
    datasets = datasets_of(df)
    targets = [(f"miou_{d}", f"mIoU on {d}", f"miou_{d}.png") for d in datasets]
    if len(datasets) > 1:
        targets.append(("miou", "mean mIoU over downstream datasets", "miou_mean.png"))
    for column, title, name in targets:

        def plot(tmp: Path, column: str = column, title: str = title) -> None:
            plot_miou(df, column, title, tmp)

        write_atomic(plot_dir / name, plot, keep_suffix=True)
        made.append(f"plots/{name}")
    write_atomic(plot_dir / "normdel.png", lambda tmp: plot_normdel(df, tmp), keep_suffix=True)
    made.append("plots/normdel.png")
    return made


def _log_wandb(cfg: ReportConfig, df: pd.DataFrame, run: Path, meta: dict[str, Any], plots: list[str]) -> None:
    import wandb

    group = cfg.wandb.group or meta.get("name") or run.name
    wb = wandb.init(
        project=cfg.wandb.project,
        group=group,
        job_type="report",
        name=f"{group}-report",
        dir=str(run),
        mode=cfg.wandb.mode,  # type: ignore[arg-type]  # WANDB_MODE, checked by wandb
        tags=list(cfg.wandb.tags),
        config={"alpha": cfg.alpha},
    )
    try:
        wb.log({"report": wandb.Table(dataframe=df), **{Path(p).stem: wandb.Image(str(run / p)) for p in plots}})
    finally:
        wb.finish()


def main(cfg: ReportConfig) -> dict[str, Any]:
    """Write ``report.csv``, ``report.md`` and the plots into ``cfg.run``; return their paths."""
    run = Path(cfg.run)
    if not run.is_dir():
        raise ConfigError(f"run={cfg.run}: no such directory")
    cells = load_cells(run)
    save_resolved(cfg, run, name="report.yaml")
    meta = _read_json(run / "sweep.json") or {"name": run.name}
    df = build_table(cells, cfg.alpha)
    plots = write_plots(df, run) if cfg.plots else []
    csv, md = df.to_csv(index=False, float_format="%.6g"), markdown_report(df, cells, meta, cfg.alpha, plots)
    write_atomic(run / "report.csv", lambda tmp: tmp.write_text(csv))
    write_atomic(run / "report.md", lambda tmp: tmp.write_text(md))
    if cfg.wandb.enabled:
        _log_wandb(cfg, df, run, meta, plots)
    unfinished = int((~df["done"]).sum())
    log.info("report: %d cells (%d unfinished) -> %s, %s", len(df), unfinished, run / "report.md", run / "report.csv")
    return {"csv": str(run / "report.csv"), "md": str(run / "report.md"), "plots": [str(run / p) for p in plots]}
