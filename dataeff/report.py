"""``dataeff report run=runs/<sweep>``: tables, plots and a markdown page per sweep, with intervals over seeds.

Reads only what the stages wrote under ``<run>/`` (layout: :mod:`dataeff.sweep_layout`):
each unit's ``cells/<cell>/seed<k>/cell.json``, ``selection/summary.json``,
``pretrain/summary.json``, ``finetune/<dataset>/results.json``; the leakage check's
``overlap/summary.json`` and ``matches.parquet``; ``sweep.json``. Writes into ``<run>``:

- ``report.csv``: one row per (method, ratio, dataset): ``n_seeds``, mean and 95% t-interval
  of mIoU, Dice, per-image Dice and NormDEL, kept, kept fraction, images seen;
- ``report_seeds.csv``: one row per (method, ratio, seed, dataset);
- ``report_comparisons.csv``: every paired comparison (vs random, full, scratch);
- ``report.md`` and ``plots/*.png``.

This module is the file-reading shell; the numbers are :mod:`dataeff.report_table`, the
page :mod:`dataeff.report_markdown`, the figures :mod:`dataeff.report_plots`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from dataeff.config import ConfigError, WandbConfig, option, redact_env, section
from dataeff.constants import CELL_NAME, DOWNSTREAM_OVERLAP, RESULTS_NAME, SUMMARY_NAME
from dataeff.files import read_json, save_resolved, write_atomic
from dataeff.lock import locked
from dataeff.report_markdown import markdown_report
from dataeff.report_plots import plot_miou, plot_normdel
from dataeff.report_table import (
    LEVEL,
    MEAN,
    comparisons,
    overlap_kinds,
    scratch_verdicts,
    seed_table,
    summary_table,
)
from dataeff.sweep_layout import (
    CELLS_DIR,
    OVERLAP_DIR,
    PLOTS_DIR,
    REPORT_COMPARISONS_CSV,
    REPORT_CSV,
    REPORT_MD,
    REPORT_SEEDS_CSV,
    SWEEP_JSON,
    seed_of,
)

log = logging.getLogger("dataeff")


@dataclass
class ReportConfig:
    """Tabulate a finished (or partly finished) sweep."""

    run: str = option("", help="sweep output directory (the one holding cells/)")
    alpha: float = option(1.0, help="NormDEL alpha: DEL = mIoU * exp(-alpha * R) (benchmark: 1.0)")
    plots: bool = option(True, help="write plots/miou_<dataset>.png and plots/normdel.png")
    wandb: WandbConfig = section(WandbConfig, help="log the tables and plots as a 'report' job of the sweep's group")

    def __post_init__(self) -> None:
        if not self.run:
            raise ConfigError("run is empty: give the sweep directory, e.g. 'dataeff report run=runs/demo'")
        if self.alpha < 0:
            raise ConfigError(f"alpha={self.alpha}: must be >= 0")


# --------------------------------------------------------------------------- reading


def _read_yaml(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.load(path), resolve=True)  # type: ignore[return-value]


def load_unit(unit_dir: Path, cell: str, seed: int) -> dict[str, Any] | None:
    """Everything the report needs from one (cell, seed) directory (None if nothing is written yet)."""
    info = read_json(unit_dir / CELL_NAME)
    selection = read_json(unit_dir / "selection" / SUMMARY_NAME)
    if info is None and selection is None:
        return None
    info = dict(info or {})
    info.setdefault("method", (selection or {}).get("method"))
    info.setdefault("ratio", (selection or {}).get("ratio"))
    info.setdefault("cell", cell)
    info.setdefault("seed", seed)
    finetune = {}
    ft_root = unit_dir / "finetune"
    names = info.get("datasets") or (
        sorted(p.name for p in ft_root.iterdir() if p.is_dir()) if ft_root.is_dir() else []
    )
    for name in names:
        res = read_json(ft_root / name / RESULTS_NAME)
        if res is not None:
            finetune[name] = res
    info["datasets"] = list(names)
    info["selection"] = selection
    info["selection_dir"] = str(unit_dir / "selection")
    info["pretrain"] = read_json(unit_dir / "pretrain" / SUMMARY_NAME)
    info["pretrain_config"] = _read_yaml(unit_dir / "pretrain" / "config.yaml")
    info["finetune"] = finetune
    return info


def load_units(run: Path, default_seed: int = 0) -> list[dict[str, Any]]:
    """Every (cell, seed) unit under ``<run>/cells``; a cell without ``seed<k>/`` (older sweeps) is one unit."""
    cells_root = run / CELLS_DIR
    if not cells_root.is_dir():
        raise ConfigError(f"run={run}: no cells/ directory; is this the out= of a 'dataeff sweep'?")
    units = []
    for cell_dir in sorted(d for d in cells_root.iterdir() if d.is_dir()):
        seeded = sorted((seed_of(d.name), d) for d in cell_dir.iterdir() if d.is_dir() and seed_of(d.name) is not None)
        targets = [(d, s) for s, d in seeded] or [(cell_dir, default_seed)]
        for unit_dir, seed in targets:
            unit = load_unit(unit_dir, cell_dir.name, int(seed))  # type: ignore[arg-type]
            if unit:
                units.append(unit)
    if not units:
        raise ConfigError(f"run={run}: cells/ holds no cell yet; run 'dataeff sweep' first")
    return units


def _link(run: Path, path: str, base: Path) -> str | None:
    """``path`` as a link relative to ``run`` (tried as given, then under ``base``); None if it does not exist."""
    for candidate in (Path(path), base / path):
        if candidate.is_file():
            try:
                return candidate.resolve().relative_to(run.resolve()).as_posix()
            except ValueError:
                return str(candidate.resolve())
    return None


def galleries(run: Path, units: list[dict[str, Any]]) -> list[tuple[str, list[str]]]:
    """Every gallery PNG listed in a selection's summary (keys ending in ``gallery``), as links."""
    found = []
    for unit in sorted(units, key=lambda u: (u["method"], float(u["ratio"] or 0), int(u.get("seed", 0)))):
        sel = unit.get("selection") or {}
        paths = [p for key, v in sorted(sel.items()) if key.endswith("gallery") and isinstance(v, list) for p in v]
        links = [link for p in paths if (link := _link(run, str(p), Path(unit["selection_dir"])))]
        if links:
            found.append((f"{unit['cell']} / seed {unit.get('seed', 0)}", links))
    return found


def overlap_extras(run: Path, units: list[dict[str, Any]]) -> dict[str, Any]:
    """The leakage check's summary, pool samples per (dataset, kind), the drops each selection recorded."""
    root = run / OVERLAP_DIR
    summary = read_json(root / SUMMARY_NAME)
    matches_path = root / "matches.parquet"
    matches = pd.read_parquet(matches_path) if matches_path.is_file() else pd.DataFrame()
    dropped = {}
    for unit in units:
        counts = (unit.get("selection") or {}).get("counts_by_reason") or {}
        if DOWNSTREAM_OVERLAP in counts:
            dropped[f"{unit['cell']}/seed{unit.get('seed', 0)}"] = int(counts[DOWNSTREAM_OVERLAP])
    sheet = root / "overlap.png"
    return {
        "overlap": summary,
        "overlap_kinds": overlap_kinds(matches),
        "overlap_dropped": dropped,
        "overlap_sheet": f"{OVERLAP_DIR}/overlap.png" if sheet.is_file() else None,
    }


# --------------------------------------------------------------------------- writing


def write_plots(summary: pd.DataFrame, run: Path) -> list[str]:
    """PNGs under ``<run>/plots``: mIoU per dataset (and their mean), NormDEL; paths relative to ``run``."""
    plot_dir = run / PLOTS_DIR
    plot_dir.mkdir(parents=True, exist_ok=True)
    made = []
    datasets = sorted(summary["dataset"].unique(), key=lambda d: (d == MEAN, d))
    for ds in datasets:
        part = summary[summary["dataset"] == ds]
        stem = "mean" if ds == MEAN else ds
        title = "mean mIoU over downstream datasets" if ds == MEAN else f"mIoU on {ds}"

        def draw(tmp: Path, part: pd.DataFrame = part, title: str = title) -> None:
            plot_miou(part, title, tmp)

        write_atomic(plot_dir / f"miou_{stem}.png", draw, keep_suffix=True)
        made.append(f"{PLOTS_DIR}/miou_{stem}.png")
    # NormDEL on the mean mIoU over datasets, as the papers define it (the only dataset when there is one).
    main_ds = MEAN if MEAN in datasets else (datasets[0] if datasets else None)
    if main_ds is not None:
        part = summary[summary["dataset"] == main_ds]
        title = "NormDEL per method (higher = more data-effective)"
        write_atomic(plot_dir / "normdel.png", lambda tmp: plot_normdel(part, title, tmp), keep_suffix=True)
        made.append(f"{PLOTS_DIR}/normdel.png")
    return made


def _write_text(path: Path, text: str) -> None:
    write_atomic(path, lambda tmp: tmp.write_text(text))


def _log_wandb(cfg: ReportConfig, tables: dict[str, pd.DataFrame], run: Path, meta: dict, plots: list[str]) -> None:
    import wandb

    group = cfg.wandb.group or meta.get("name") or run.name
    wb = wandb.init(
        project=cfg.wandb.project,
        group=group,
        job_type="report",
        name=f"{group}/report",  # beside <sweep>/<cell>/seed<k>/<stage> in the group
        dir=str(run),
        mode=cfg.wandb.mode,  # type: ignore[arg-type]  # WANDB_MODE, checked by wandb
        tags=list(cfg.wandb.tags),
        # Environment values as their ${oc.env:...}, never resolved (an API key).
        config=redact_env(
            {**cfg.wandb.config, "sweep": meta.get("name") or run.name, "alpha": cfg.alpha, "level": LEVEL}
        ),
    )
    try:
        logged: dict[str, Any] = {name: wandb.Table(dataframe=df) for name, df in tables.items()}
        logged.update({Path(p).stem: wandb.Image(str(run / p)) for p in plots})
        wb.log(logged)
    finally:
        wb.finish()


@locked("report", key="run")
def main(cfg: ReportConfig) -> dict[str, Any]:
    """Write the report's CSVs, ``report.md`` and plots into ``cfg.run``; return their paths."""
    run = Path(cfg.run)
    if not run.is_dir():
        raise ConfigError(f"run={cfg.run}: no such directory")
    meta = read_json(run / SWEEP_JSON) or {"name": run.name}
    units = load_units(run, int(meta.get("seed", 0)))
    save_resolved(cfg, run, name="report.yaml")
    seeds = seed_table(units, cfg.alpha)
    summary = summary_table(seeds)
    comps = comparisons(seeds)
    verdicts = scratch_verdicts(comps, sorted(summary["dataset"].unique(), key=lambda d: (d == MEAN, d)))
    plots = write_plots(summary, run) if cfg.plots else []
    extras = {**overlap_extras(run, units), "galleries": galleries(run, units), "plots": plots}
    md = markdown_report(summary, seeds, comps, verdicts, units, meta, cfg.alpha, extras)
    outputs = {REPORT_CSV: summary, REPORT_SEEDS_CSV: seeds, REPORT_COMPARISONS_CSV: comps}
    texts = {name: df.to_csv(index=False, float_format="%.6g") for name, df in outputs.items()}
    texts[REPORT_MD] = md
    for name, text in texts.items():
        _write_text(run / name, text)
    if cfg.wandb.enabled:
        _log_wandb(cfg, {"report": summary, "report_seeds": seeds, "comparisons": comps}, run, meta, plots)
    unfinished = int((~seeds["done"].astype(bool)).sum()) if len(seeds) else 0
    log.info("report: %d runs (%d unfinished) -> %s, %s", len(seeds), unfinished, run / REPORT_MD, run / REPORT_CSV)
    return {
        "csv": str(run / REPORT_CSV),
        "seeds_csv": str(run / REPORT_SEEDS_CSV),
        "comparisons_csv": str(run / REPORT_COMPARISONS_CSV),
        "md": str(run / REPORT_MD),
        "plots": [str(run / p) for p in plots],
    }
