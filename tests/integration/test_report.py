"""report: hand-written (cell, seed) directories in; report.csv, report_seeds.csv, report.md and plots out.

The numbers are chosen so that the intervals and sentences can be checked by hand:
t(0.975, 2) = 4.302653, so with 3 seeds the half-width is 4.302653 · s / √3.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pytest

from dataeff import metrics
from dataeff.config import ConfigError, WandbConfig, load_config
from dataeff.report import ReportConfig, main
from dataeff.report_table import comparisons, scratch_verdicts, seed_table, summary_table

POOL = 200
NOWB = WandbConfig(enabled=False)
T975_2 = 4.302653

# mIoU per seed 0, 1, 2 on dataset "a".
SCRATCH = [0.60, 0.62, 0.64]
FULL = [0.70, 0.73, 0.74]
MEDDEL = [0.61, 0.60, 0.66]
RANDOM = [0.60, 0.63, 0.63]


def _write(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))


def make_unit(
    run: Path,
    method: str,
    ratio: float,
    seed: int | None,
    mious: dict[str, float | None],
    kept: int | None = None,
    done: bool = True,
    selection: dict | None = None,
    per_image: bool = True,
) -> Path:
    """One (cell, seed) as the sweep writes it; ``seed=None`` is the old layout without seed<k>/."""
    cell = run / "cells" / ("scratch" if method == "scratch" else f"{method}-r{ratio:g}")
    unit = cell if seed is None else cell / f"seed{seed}"
    _write(
        unit / "cell.json",
        {
            "format": "dataeff-cell/1",
            "cell": cell.name,
            "method": method,
            "ratio": ratio,
            **({} if seed is None else {"seed": seed}),
            "datasets": sorted(mious),
            "done": done,
            "stages": {"finetune/a": {"wall_s": 2.0}},
        },
    )
    if method != "scratch":
        kept = round(ratio * POOL) if kept is None else kept
        _write(
            unit / "selection" / "summary.json",
            {
                "method": method,
                "ratio": ratio,
                "pool_size": POOL,
                "kept": kept,
                "kept_fraction": kept / POOL,
                "counts_by_reason": {"kept": kept, "not_selected": max(POOL - kept - 3, 0), "downstream_overlap": 3},
                **(selection or {}),
            },
        )
        _write(
            unit / "pretrain" / "summary.json",
            {
                "steps": 20,
                "images_seen": 320,
                "budget": "steps",
                "epochs_seen": 320 / kept,
                "wall_time_s": 36.0,
                "device": "2 x cpu",
                "world_size": 2,
            },
        )
        (unit / "pretrain" / "config.yaml").write_text("encoder:\n  embed_dim: 64\n  depth: 2\n")
    for ds, miou in mious.items():
        if miou is not None:
            res = {"miou": miou, "dice": miou + 0.05, "fg_iou": miou - 0.1, "n_train": 14, "n_val": 3, "n_test": 3}
            if per_image:
                res |= {"scoring": "native", "per_image": {"dice_mean": miou + 0.02, "iou_mean": miou - 0.05, "n": 3}}
            if method == "scratch":
                res["encoder"] = "random-init"
            _write(unit / "finetune" / ds / "results.json", res)
    return unit


def make_sweep(run: Path, full: list[float] = FULL) -> Path:
    for seed in range(3):
        make_unit(run, "scratch", 0.0, seed, {"a": SCRATCH[seed]})
        make_unit(run, "full", 1.0, seed, {"a": full[seed]})
        gallery = run / "cells" / "meddel-r0.05" / f"seed{seed}" / "selection" / "gallery" / "removed.png"
        make_unit(run, "meddel", 0.05, seed, {"a": MEDDEL[seed]}, selection={"gallery": [str(gallery)]})
        gallery.parent.mkdir()
        gallery.write_bytes(b"\x89PNG\r\n\x1a\nfake")
        make_unit(run, "random", 0.05, seed, {"a": RANDOM[seed]})
        # OptiDEL could compose only half its budget: R = 0.1 at nominal 0.2.
        make_unit(run, "optidel", 0.2, seed, {"a": RANDOM[seed] + 0.01}, kept=20)
    _write(
        run / "sweep.json",
        {"name": "unit", "seeds": [0, 1, 2], "skipped": [{"cell": "random-r1", "why": "identical to full-r1"}]},
    )
    overlap = run / "overlap"
    _write(
        overlap / "summary.json",
        {
            "inputs": {"signals": ["exact", "phash"]},
            "counts": {"a": {"pairs": 4, "files": 2, "pool_keys": 3, "exact": 1, "phash": 1, "embedding": 0}},
            "excluded_pool_keys": 3,
        },
    )
    pd.DataFrame(
        {
            "pool_key": ["p1", "p2", "p2", "p3"],
            "dataset": ["a"] * 4,
            "file": ["images/x.jpg", "images/y.jpg", "images/y.jpg", "images/y.jpg"],
            "kind": ["exact", "exact", "phash", "phash"],
        }
    ).to_parquet(overlap / "matches.parquet")
    (overlap / "overlap.png").write_bytes(b"\x89PNG\r\n\x1a\nfake")
    return run


@pytest.fixture
def run(tmp_path: Path) -> Path:
    return make_sweep(tmp_path / "sweep")


def test_csv_has_mean_and_t_interval_per_cell(run: Path) -> None:
    out = main(ReportConfig(run=str(run), wandb=NOWB))
    df = pd.read_csv(out["csv"])
    assert sorted(zip(df["method"], df["ratio"], strict=True)) == sorted(
        [("scratch", 0.0), ("full", 1.0), ("meddel", 0.05), ("random", 0.05), ("optidel", 0.2)]
    )
    for col in ("dataset", "n_seeds", "miou_mean", "miou_ci_low", "miou_ci_high", "dice_ci_low", "normdel_ci_high"):
        assert col in df.columns, col
    for col in ("dice_img_mean", "kept", "kept_fraction", "images_seen"):
        assert col in df.columns, col
    med = df[df.method == "meddel"].iloc[0]
    assert med["n_seeds"] == 3 and med["dataset"] == "a"
    # [0.61, 0.60, 0.66]: mean 0.623333, s = 0.032146, half = 4.302653 * s / sqrt(3) = 0.079854.
    assert med["miou_mean"] == pytest.approx(0.623333, abs=1e-6)
    assert med["miou_ci_high"] - med["miou_mean"] == pytest.approx(0.079854, abs=1e-5)
    assert med["miou_mean"] - med["miou_ci_low"] == pytest.approx(T975_2 * 0.0321455 / math.sqrt(3), abs=1e-5)
    # Dice is mIoU + 0.05 here, per-image Dice mIoU + 0.02: same width, shifted means.
    assert med["dice_mean"] == pytest.approx(0.673333, abs=1e-6)
    assert med["dice_img_mean"] == pytest.approx(0.643333, abs=1e-6)
    # NormDEL per seed, then its interval.
    nd = [metrics.normdel(m, 10 / POOL, 1.0) for m in MEDDEL]
    assert med["normdel_mean"] == pytest.approx(sum(nd) / 3, abs=1e-6)
    assert med["kept"] == 10 and med["kept_fraction"] == pytest.approx(0.05) and med["images_seen"] == 320
    scratch = df[df.method == "scratch"].iloc[0]
    # NormDEL needs R in (0, 1]: none for scratch, which pre-trains on nothing.
    assert scratch["kept_fraction"] == 0 and math.isnan(scratch["normdel_mean"])
    seeds = pd.read_csv(out["seeds_csv"])
    assert len(seeds) == 15 and sorted(set(seeds["seed"])) == [0, 1, 2]
    assert seeds[(seeds.method == "meddel") & (seeds.seed == 2)]["miou"].iloc[0] == pytest.approx(0.66)


def test_sentences_and_comparisons(run: Path) -> None:
    out = main(ReportConfig(run=str(run), plots=False, wandb=NOWB))
    md = Path(out["md"]).read_text()
    # Paired by seed: MedDEL - random = [+0.01, -0.03, +0.03], MedDEL - full = [-0.09, -0.13, -0.08].
    assert "MedDEL 5% vs random 5%: +0.3 mIoU [−7.3, +7.9]: not distinguishable with 3 seeds" in md
    assert "MedDEL 5% vs full: −10.0 mIoU [−16.6, −3.4]: worse beyond the 95% CI" in md
    assert "full vs scratch: +10.3 mIoU [+8.9, +11.8]: better beyond the 95% CI" in md
    assert "MedDEL 5% vs scratch: +0.3 mIoU [−4.8, +5.5]: not distinguishable with 3 seeds" in md
    comps = pd.read_csv(out["comparisons_csv"])
    row = comps[(comps.method == "meddel") & (comps.versus == "random")].iloc[0]
    assert row["n"] == 3 and row["diff_mean"] == pytest.approx(0.0033333, abs=1e-6)
    # random is compared with full and scratch, never with itself; scratch with nothing.
    assert set(comps[comps.method == "random"]["versus"]) == {"full", "scratch"}
    assert comps[comps.method == "scratch"].empty


def test_box_says_when_pretraining_beats_scratch(run: Path) -> None:
    md = Path(main(ReportConfig(run=str(run), plots=False, wandb=NOWB))["md"]).read_text()
    head = md.split("## Protocol")[0]
    assert "Does pre-training help at all?" in head
    assert "pre-training beat training from scratch beyond the 95% CI** for: full." in head
    # Only full beats scratch, so only full is ranked.
    assert "- 1: full" in md and "- 0.05:" not in md


def test_box_and_no_ranking_when_nothing_beats_scratch(tmp_path: Path) -> None:
    run = make_sweep(tmp_path / "sweep", full=[0.61, 0.60, 0.66])
    md = Path(main(ReportConfig(run=str(run), plots=False, wandb=NOWB))["md"]).read_text()
    first = md.split("## Protocol")[0]
    assert "NO pre-training beat training from scratch beyond the 95% CI" in first
    assert "none is ranked below" in first
    assert "Not ranked: no pre-trained cell beat scratch (no pre-training) beyond the CI" in md
    assert " > " not in md.split("### Ranking")[1].split("###")[0]


def test_protocol_overlap_galleries_and_off_nominal(run: Path) -> None:
    out = main(ReportConfig(run=str(run), wandb=NOWB))
    md = Path(out["md"]).read_text()
    assert "Pipeline demonstration, not a paper reproduction" in md
    assert "20 steps" in md and "Student-t" in md and "Seeds: 0, 1, 2" in md
    assert "native resolution" in md and "per-image Dice is the mean over test images" in md
    assert "a: train 14 / val 3 / test 3" in md
    assert "Skipped random-r1" in md
    # Leakage: 3 pool samples, p1 and p2 exact (strongest kind), p3 pHash; removed by every selection.
    assert "| a | 2 | 3 | 2 | 1 | 0 |" in md
    assert "reason `downstream_overlap`: 3 per selection" in md
    assert "[overlap/overlap.png](overlap/overlap.png)" in md
    assert "(cells/meddel-r0.05/seed1/selection/gallery/removed.png)" in md
    # OptiDEL kept 20 of 200 at nominal 0.2: shown at its real R.
    assert "**0.100** (nominal 0.2)" in md
    names = sorted(Path(p).name for p in out["plots"])
    assert names == ["miou_a.png", "normdel.png"]
    for p in out["plots"]:
        assert Path(p).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"plots/{Path(p).name}" in md


def test_two_datasets_get_a_mean_row(tmp_path: Path) -> None:
    run = tmp_path / "sweep"
    for seed in range(2):
        make_unit(run, "full", 1.0, seed, {"a": 0.7, "b": 0.5 + 0.1 * seed})
    df = pd.read_csv(main(ReportConfig(run=str(run), wandb=NOWB))["csv"])
    mean = df[df.dataset == "mean"].iloc[0]
    assert mean["miou_mean"] == pytest.approx((0.6 + 0.65) / 2)
    assert mean["n_seeds"] == 2
    # The papers' NormDEL: of the mean mIoU over datasets, per seed.
    nd = [metrics.normdel(m, 1.0, 1.0) for m in (0.6, 0.65)]
    assert mean["normdel_mean"] == pytest.approx(sum(nd) / 2)
    assert (tmp_path / "sweep" / "plots" / "miou_mean.png").is_file()


def test_old_outputs_show_dashes_not_fake_numbers(tmp_path: Path) -> None:
    """A sweep from before seeds (cells/<cell>/cell.json), without per-image scores, budget or scoring."""
    run = tmp_path / "sweep"
    make_unit(run, "full", 1.0, None, {"a": 0.6}, per_image=False)
    make_unit(run, "random", 0.2, None, {"a": None}, done=False, per_image=False)
    _write(run / "sweep.json", {"name": "old", "seed": 4})
    main(ReportConfig(run=str(run), plots=False, wandb=NOWB))
    df = pd.read_csv(run / "report.csv")
    r = df[df.method == "random"].iloc[0]
    assert math.isnan(r["miou_mean"]) and math.isnan(r["normdel_mean"]) and not r["done"]
    f = df[df.method == "full"].iloc[0]
    assert f["n_seeds"] == 1 and math.isnan(f["miou_ci_low"]) and math.isnan(f["dice_img_mean"])
    md = (run / "report.md").read_text()
    assert "random (unfinished)" in md and "0.600 (no CI)" in md
    assert "per-image scores: – " in md and "does not record the scoring resolution" in md
    assert "no `scratch` cell in this sweep" in md
    assert "Leakage check" in md and "Not run" in md
    seeds = pd.read_csv(run / "report_seeds.csv")
    assert list(seeds["seed"]) == [4, 4]


def test_pure_core_pairs_only_shared_seeds() -> None:
    units = [
        {"method": "scratch", "ratio": 0.0, "seed": s, "datasets": ["a"], "finetune": {"a": {"miou": 0.5}}}
        for s in (0, 1, 2)
    ]
    units += [
        {"method": "full", "ratio": 1.0, "seed": s, "datasets": ["a"], "finetune": {"a": {"miou": 0.6 + 0.01 * s}}}
        for s in (1, 2, 3)
    ]
    seeds = seed_table(units, 1.0)
    comps = comparisons(seeds)
    (row,) = comps.to_dict("records")
    assert row["n"] == 2 and row["diff_mean"] == pytest.approx(0.115)
    verdict = scratch_verdicts(comps, ["a"])["a"]
    assert verdict["status"] == "some_beat" and verdict["beat"] == [("full", 1.0)]
    summary = summary_table(seeds)
    assert list(summary["method"]) == ["scratch", "full"]  # the reference first


def test_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="run"):
        load_config(ReportConfig, None, [])
    with pytest.raises(ConfigError, match="no cells/"):
        main(ReportConfig(run=str(tmp_path), wandb=NOWB))
