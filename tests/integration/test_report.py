"""report: hand-written cell directories in, report.csv/report.md/plots out."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pytest

from dataeff import metrics
from dataeff.config import ConfigError, WandbConfig, load_config
from dataeff.report import ReportConfig, build_table, cell_row, main

POOL = 200
NOWB = WandbConfig(enabled=False)


def _write(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))


def make_cell(
    run: Path,
    method: str,
    ratio: float,
    mious: dict[str, float | None],
    kept: int | None = None,
    done: bool = True,
    extra_selection: dict | None = None,
) -> None:
    """A cell as the sweep writes it: cell.json + stage artefacts."""
    kept = round(ratio * POOL) if kept is None else kept
    cell = run / "cells" / f"{method}-r{ratio:g}"
    _write(
        cell / "cell.json",
        {
            "format": "dataeff-cell/1",
            "cell": cell.name,
            "method": method,
            "ratio": ratio,
            "datasets": sorted(mious),
            "done": done,
            "stages": {"select": {"wall_s": 1.0}, "pretrain": {"wall_s": 36.0}},
        },
    )
    _write(
        cell / "selection" / "summary.json",
        {
            "method": method,
            "ratio": ratio,
            "pool_size": POOL,
            "kept": kept,
            "kept_fraction": kept / POOL,
            "counts_by_reason": {
                "kept": kept,
                "not_selected": POOL - kept - 2,
                "redundant_of:a": 1,
                "redundant_of:b": 1,
            },
            **(extra_selection or {}),
        },
    )
    _write(
        cell / "pretrain" / "summary.json",
        {"steps": 20, "images_seen": 320, "wall_time_s": 36.0, "device": "2 x cpu", "world_size": 2},
    )
    (cell / "pretrain" / "config.yaml").write_text("encoder:\n  embed_dim: 64\n  depth: 2\n")
    for ds, miou in mious.items():
        if miou is not None:
            _write(
                cell / "finetune" / ds / "results.json",
                {"miou": miou, "dice": miou + 0.05, "fg_iou": miou - 0.1, "dataset": ds},
            )


def _composition(samples: int, invalid: float, excess: float) -> dict:
    return {"samples": samples, "invalid_share": invalid, "excess_duplicate_share": excess}


POOL_SHARES = _composition(200, 0.08, 0.25)


@pytest.fixture
def run(tmp_path: Path) -> Path:
    run = tmp_path / "sweep"
    make_cell(run, "full", 1.0, {"a": 0.72, "b": 0.70})
    for r, (ma, mb) in {0.05: (0.70, 0.66), 0.2: (0.71, 0.69)}.items():
        make_cell(
            run,
            "random",
            r,
            {"a": ma - 0.02, "b": mb - 0.02},
            extra_selection={
                "audit": {
                    "dropped": 0,
                    "precision": None,
                    "recall": 0.0,
                    "kept": _composition(40, 0.075, 0.3),
                    "pool": POOL_SHARES,
                }
            },
        )
        make_cell(
            run,
            "meddel",
            r,
            {"a": ma, "b": mb},
            extra_selection={
                "audit": {
                    "dropped": 30,
                    "precision": 0.8,
                    "recall": 0.5,
                    "kept": _composition(40, 0.0, 0.05),
                    "pool": POOL_SHARES,
                }
            },
        )
    make_cell(
        run,
        "optidel",
        0.05,
        {"a": 0.73, "b": 0.71},
        extra_selection={
            "mean_hardness_selected": 0.9,
            "mean_hardness_all": 0.5,
            "cluster_coverage": 1.0,
            "sam_model": "tiny (random init; not a real SAM)",
        },
    )
    _write(
        run / "sweep.json",
        {"name": "unit", "seed": 7, "skipped": [{"cell": "random-r1", "why": "identical to full-r1"}]},
    )
    return run


def test_csv_rows_and_normdel(run: Path) -> None:
    out = main(ReportConfig(run=str(run), wandb=NOWB))
    df = pd.read_csv(out["csv"])
    # One row per (method, ratio) cell, nothing duplicated or lost.
    assert sorted(zip(df["method"], df["ratio"], strict=False)) == sorted(
        [("full", 1.0), ("random", 0.05), ("random", 0.2), ("meddel", 0.05), ("meddel", 0.2), ("optidel", 0.05)]
    )
    for col in ("method", "ratio", "kept", "miou", "normdel", "miou_a", "dice_b", "images_seen", "pretrain_hours"):
        assert col in df.columns, col
    for _, r in df.iterrows():
        mean = (r["miou_a"] + r["miou_b"]) / 2
        assert r["miou"] == pytest.approx(mean)
        assert r["normdel"] == pytest.approx(metrics.normdel(mean, r["kept"] / POOL, 1.0))
    med = df[(df.method == "meddel") & (df.ratio == 0.05)].iloc[0]
    assert med["kept"] == 10 and med["miou_a"] == pytest.approx(0.70)
    # 36 s on 2 CPU ranks = 72 CPU-seconds.
    assert med["pretrain_hours"] == pytest.approx(72 / 3600)


def test_alpha_changes_normdel(run: Path) -> None:
    main(ReportConfig(run=str(run), alpha=0.0, plots=False, wandb=NOWB))
    df = pd.read_csv(run / "report.csv")
    r = df[df.method == "full"].iloc[0]
    assert r["normdel"] == pytest.approx(1 / (1 + math.exp(-0.71)))


def test_markdown_and_plots(run: Path) -> None:
    out = main(ReportConfig(run=str(run), wandb=NOWB))
    md = Path(out["md"]).read_text()
    assert "Pipeline demonstration, not a paper reproduction" in md
    assert "tiny random-init SAM" in md
    assert "0.80 / 0.50" in md  # audit precision / recall of the meddel cells
    # Every method gets the composition of what it kept, beside the pool's; random has no drops to score.
    assert "| 0.0% / 5.0% (8.0% / 25.0%) |" in md and "| – | 7.5% / 30.0% (8.0% / 25.0%) |" in md
    assert "redundant 2" in md  # redundant_of:<key> folded into one count
    assert "Skipped random-r1" in md and "Seed 7" in md
    assert "20 steps" in md
    names = sorted(Path(p).name for p in out["plots"])
    assert names == ["miou_a.png", "miou_b.png", "miou_mean.png", "normdel.png"]
    for p in out["plots"]:
        assert Path(p).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"plots/{Path(p).name}" in md


def test_unfinished_cell_has_nan_not_fake_numbers(tmp_path: Path) -> None:
    run = tmp_path / "sweep"
    make_cell(run, "full", 1.0, {"a": 0.6})
    make_cell(run, "random", 0.2, {"a": None}, done=False)
    main(ReportConfig(run=str(run), plots=False, wandb=NOWB))
    df = pd.read_csv(run / "report.csv")
    r = df[df.method == "random"].iloc[0]
    assert math.isnan(r["miou"]) and math.isnan(r["normdel"]) and not r["done"]
    assert "random (unfinished)" in (run / "report.md").read_text()


def test_paper_check_values_through_cell_row() -> None:
    cell = {
        "method": "meddel",
        "ratio": 0.05,
        "datasets": ["k"],
        "finetune": {"k": {"miou": 0.7095, "dice": 0.8}},
        "selection": {"kept": 5, "pool_size": 100, "kept_fraction": 0.05},
    }
    assert cell_row(cell, 1.0)["normdel"] == pytest.approx(0.6626, abs=1e-4)
    df = build_table([cell], 1.0)
    assert list(df["method"]) == ["meddel"]


def test_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="run"):
        load_config(ReportConfig, None, [])
    with pytest.raises(ConfigError, match="no cells/"):
        main(ReportConfig(run=str(tmp_path), wandb=NOWB))
