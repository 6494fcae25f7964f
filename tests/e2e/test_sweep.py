"""A tiny sweep end to end: 2 methods x 2 ratios on real (downscaled) images, then a resume."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from dataeff import metrics
from dataeff.config import ConfigError, load_config
from dataeff.sweep import SweepConfig, main, plan, plan_cells
from tests.fixtures import KVASIR, make_shards

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "configs" / "sweep" / "tiny.yaml"


def make_downstream(root: Path, n: int = 16, size: int = 48) -> Path:
    """A Kvasir-layout folder (images/, masks/) of the *last* ``n`` Kvasir-SEG pairs, downscaled.

    The pool fixture uses the first images, so pool and downstream never overlap.
    """
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for path in sorted((KVASIR / "images").glob("*.jpg"))[-n:]:
        Image.open(path).convert("RGB").resize((size, size), Image.BILINEAR).save(
            root / "images" / path.name, quality=90
        )
        mask = Image.open(KVASIR / "masks" / (path.stem + ".png")).convert("L")
        mask.resize((size, size), Image.NEAREST).save(root / "masks" / (path.stem + ".png"))
    return root


@pytest.fixture(scope="module")
def sweep_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[SweepConfig, dict, dict]:
    """The tiny sweep run one stage at a time, as launch/slurm/sweep.sh's jobs run it.

    Returns the config, the report paths of the last run, and what each earlier run
    left: the error of a stage run too early, or the cells' finished steps.
    """
    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("WANDB_SILENT", "true")
    tmp = tmp_path_factory.mktemp("sweep")
    shards = make_shards(tmp, n=24, size=48, samples_per_shard=8)
    down = make_downstream(tmp / "down")
    base = [f"out={tmp / 'run'}", f"shards={shards}", f"datasets.tiny.data.root={down}"]
    cfg = load_config(SweepConfig, str(TINY), base)

    def run_stage(stage: str, report: bool = False) -> dict:
        return main(load_config(SweepConfig, str(TINY), [*base, f"stages=[{stage}]", f"report={report}"]))

    def finished() -> dict[str, list[str]]:
        records = (json.loads(p.read_text()) for p in sorted(Path(cfg.out).glob("cells/*/cell.json")))
        return {r["cell"]: sorted(r["stages"]) + (["done"] if r["done"] else []) for r in records}

    seen: dict = {}
    with pytest.raises(ConfigError) as too_early:
        run_stage("select")
    seen["select before embed"] = str(too_early.value)
    run_stage("embed")
    with pytest.raises(ConfigError) as too_early:
        run_stage("pretrain")
    seen["pretrain before select"] = str(too_early.value)
    run_stage("select")
    seen["after select"] = finished()
    run_stage("pretrain")
    seen["after pretrain"] = finished()
    return cfg, run_stage("finetune", report=True), seen


def test_stage_runs_check_their_order(sweep_run: tuple[SweepConfig, dict, dict]) -> None:
    cfg, _, seen = sweep_run
    assert "select needs the pool embeddings" in seen["select before embed"]
    assert "run stages=[embed] first" in seen["select before embed"]
    assert seen["pretrain before select"].startswith("cell random-r0.25: pretrain needs select")
    cells = ["meddel-r0.25", "meddel-r0.5", "random-r0.25", "random-r0.5"]
    assert seen["after select"] == {c: ["select"] for c in cells}
    assert seen["after pretrain"] == {c: ["pretrain", "select"] for c in cells}
    bad = [f"shards={cfg.shards}", f"datasets.tiny.data.root={cfg.shards}", "stages=[pretrain,report]"]
    with pytest.raises(ConfigError, match=r"stages=\['pretrain', 'report'\]: choose"):
        load_config(SweepConfig, str(TINY), bad)


@pytest.mark.timeout(600)
def test_tiny_sweep_writes_report(sweep_run: tuple[SweepConfig, dict, dict]) -> None:
    cfg, paths, _ = sweep_run
    run = Path(cfg.out)
    df = pd.read_csv(run / "report.csv")
    assert sorted(zip(df["method"], df["ratio"], strict=False)) == [
        ("meddel", 0.25),
        ("meddel", 0.5),
        ("random", 0.25),
        ("random", 0.5),
    ]
    assert df["done"].all()
    n = 24
    for _, r in df.iterrows():
        assert r["kept"] == round(r["ratio"] * n)
        assert 0.0 <= r["miou"] <= 1.0
        assert r["normdel"] == pytest.approx(metrics.normdel(r["miou"], r["kept"] / n))
        # The same step budget for every cell: 6 steps of at most 8 images (a subset smaller
        # than a batch makes shorter batches, so images seen can be below 6 x 8).
        assert r["pretrain_steps"] == 6 and 6 <= r["images_seen"] <= 48
    md = (run / "report.md").read_text()
    assert "Pipeline demonstration" in md and "| meddel | 0.25 |" in md
    assert sorted(Path(p).name for p in paths["plots"]) == ["miou_tiny.png", "normdel.png"]
    for p in paths["plots"]:
        assert Path(p).stat().st_size > 1000
    # One embedding pass, from the bootstrap encoder, shared by every cell.
    assert json.loads((run / "embed" / "header.json").read_text())
    assert (run / "bootstrap" / "encoder.safetensors").is_file()
    for cell in ("random-r0.25", "meddel-r0.5"):
        rec = json.loads((run / "cells" / cell / "cell.json").read_text())
        assert (
            rec["done"]
            and rec["images_seen"]
            == df[(df.method == rec["method"]) & (df.ratio == rec["ratio"])]["images_seen"].iloc[0]
        )
        assert set(rec["stages"]) == {"select", "pretrain", "finetune/tiny"}
        assert all(s["wall_s"] > 0 for s in rec["stages"].values())
        sel = json.loads((run / "cells" / cell / "selection" / "summary.json").read_text())
        assert sel["method"] == cell.split("-")[0] and sel["config"]["seed"] == cfg.seed


@pytest.mark.timeout(300)
def test_rerun_skips_finished_cells(
    sweep_run: tuple[SweepConfig, dict, dict], caplog: pytest.LogCaptureFixture
) -> None:
    cfg, _, _ = sweep_run
    run = Path(cfg.out)
    cells = sorted((run / "cells").iterdir())
    before = {c.name: (c / "cell.json").read_text() for c in cells}
    mtimes = {p: p.stat().st_mtime_ns for c in cells for p in c.rglob("*") if p.is_file()}
    logger = logging.getLogger("dataeff")
    logger.addHandler(caplog.handler)
    try:
        with caplog.at_level(logging.INFO, logger="dataeff"):
            main(cfg)
    finally:
        logger.removeHandler(caplog.handler)
    skipped = {r.getMessage().split()[2] for r in caplog.records if "is done" in r.getMessage()}
    assert skipped == {c.name for c in cells}
    assert {c.name: (c / "cell.json").read_text() for c in cells} == before
    # Nothing inside a cell was rewritten: no stage ran again.
    assert {p: p.stat().st_mtime_ns for c in cells for p in c.rglob("*") if p.is_file()} == mtimes


def same_sweep(cfg: SweepConfig, *extra: str) -> SweepConfig:
    """The finished sweep's config with ``extra`` key=value changes."""
    root = cfg.datasets["tiny"]["data"]["root"]
    return load_config(
        SweepConfig, str(TINY), [f"out={cfg.out}", f"shards={cfg.shards}", f"datasets.tiny.data.root={root}", *extra]
    )


def test_changed_settings_are_not_mixed_into_finished_cells(sweep_run: tuple[SweepConfig, dict, dict]) -> None:
    cfg, _, _ = sweep_run
    with pytest.raises(ConfigError, match="other settings"):
        main(same_sweep(cfg, "pretrain.trainer.max_steps=7"))


def test_keys_of_other_methods_leave_finished_cells_valid(sweep_run: tuple[SweepConfig, dict, dict]) -> None:
    """Configuring OptiDEL's SAM (or SemDeDup) later must not invalidate the random/MedDEL cells."""
    cfg, _, _ = sweep_run
    cells = sorted(Path(cfg.out).glob("cells/*/cell.json"))
    before = [c.read_text() for c in cells]
    main(same_sweep(cfg, "select.sam.points_per_side=3", "select.semdedup.epsilon=0.2"))
    assert [c.read_text() for c in cells] == before
    with pytest.raises(ConfigError, match="other settings"):  # MedDEL's own keys still count for its cells
        main(same_sweep(cfg, "select.meddel.blur_var=81.0"))


def test_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="shards is empty"):
        load_config(SweepConfig, str(TINY), [])
    with pytest.raises(ConfigError, match="methods"):
        load_config(SweepConfig, str(TINY), ["shards=x", "methods=[nope]"])
    with pytest.raises(ConfigError, match="ratios"):
        load_config(SweepConfig, str(TINY), ["shards=x", "ratios=[5]"])
    # Keys the sweep fills in every cell are not in its templates.
    for key in ("select.out", "embed.data.shards", "pretrain.seed", "finetune.encoder.weights"):
        with pytest.raises(ConfigError, match=f"unknown config key '{key}'"):
            load_config(
                SweepConfig, str(TINY), [f"shards={tmp_path}", f"datasets.tiny.data.root={tmp_path}", f"{key}=x"]
            )


def test_plan_cells_protocol() -> None:
    cells, skipped = plan_cells(["full", "random", "meddel", "optidel"], [0.5, 0.05, 1.0], {"optidel": "no SAM"})
    assert [c.name for c in cells] == [
        "full-r1",
        "random-r0.05",
        "random-r0.5",
        "meddel-r0.05",
        "meddel-r0.5",
        "meddel-r1",
    ]
    assert {s["cell"]: s["why"] for s in skipped} == {
        "random-r1": "random at 1.0 keeps every sample: identical to full-r1",
        "optidel": "no SAM",
    }
    # Without full in the sweep, random at 1.0 is the only 100% reference and runs.
    cells, _ = plan_cells(["random"], [1.0], {})
    assert [c.name for c in cells] == ["random-r1"]


def test_dataset_keys_are_checked_before_work(tmp_path: Path) -> None:
    cfg = load_config(
        SweepConfig,
        str(TINY),
        [f"shards={tmp_path}", f"datasets.tiny.data.root={tmp_path}", "datasets.tiny.data.not_a_key=1"],
    )
    with pytest.raises(ConfigError, match="datasets.tiny"):
        plan(cfg, str(tmp_path), "")
