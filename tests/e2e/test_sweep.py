"""A tiny sweep end to end: 2 methods x 2 ratios + scratch, 2 seeds, on real (downscaled) images.

Then a resume, changed settings, and a seed added to the finished sweep.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from dataeff import metrics
from dataeff.cli import load_stage_config
from dataeff.config import ConfigError, load_config
from dataeff.constants import ENCODER_WEIGHTS
from dataeff.sweep import SweepConfig, main, plan, plan_cells
from tests.fixtures import KVASIR, make_shards

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "configs" / "sweep" / "tiny.yaml"


def make_downstream(root: Path, n: int = 16, size: int = 48, leak: Path | None = None) -> Path:
    """A Kvasir-layout folder (images/, masks/) of the *last* ``n`` Kvasir-SEG pairs, downscaled.

    The pool fixture uses the first images, so pool and downstream do not overlap, unless
    ``leak`` (a pool image file) is copied in as ``leak.jpg`` with an empty mask.
    """
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for path in sorted((KVASIR / "images").glob("*.jpg"))[-n:]:
        Image.open(path).convert("RGB").resize((size, size), Image.BILINEAR).save(
            root / "images" / path.name, quality=90
        )
        mask = Image.open(KVASIR / "masks" / (path.stem + ".png")).convert("L")
        mask.resize((size, size), Image.NEAREST).save(root / "masks" / (path.stem + ".png"))
    if leak is not None:
        (root / "images" / "leak.jpg").write_bytes(leak.read_bytes())
        Image.new("L", Image.open(leak).size, 0).save(root / "masks" / "leak.png")
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
    # One pool image is also a downstream image: the leakage check must find it and every selection drop it.
    down = make_downstream(tmp / "down", leak=sorted((tmp / "raw").rglob("*.jpg"))[0])
    base = [f"out={tmp / 'run'}", f"shards={shards}", f"datasets.tiny.data.root={down}"]
    cfg = load_config(SweepConfig, str(TINY), base)

    def run_stage(stage: str, report: bool = False) -> dict:
        return main(load_config(SweepConfig, str(TINY), [*base, f"stages=[{stage}]", f"report={report}"]))

    def finished() -> dict[str, list[str]]:
        records = (json.loads(p.read_text()) for p in sorted(Path(cfg.out).glob("cells/*/seed*/cell.json")))
        return {f"{r['cell']}/{r['seed']}": sorted(r["stages"]) + (["done"] if r["done"] else []) for r in records}

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


UNITS = [f"{c}/{s}" for c in ("meddel-r0.25", "meddel-r0.5", "random-r0.25", "random-r0.5") for s in (0, 1)]


def test_stage_runs_check_their_order(sweep_run: tuple[SweepConfig, dict, dict]) -> None:
    cfg, _, seen = sweep_run
    assert "select needs the pool embeddings" in seen["select before embed"]
    assert "the leakage check" in seen["select before embed"]
    assert "run stages=[embed] first" in seen["select before embed"]
    assert seen["pretrain before select"].startswith("cell random-r0.25/seed0: pretrain needs select")
    # Scratch units have no select or pretrain: nothing of theirs runs before the finetune stage.
    assert seen["after select"] == {u: ["select"] for u in UNITS}
    assert seen["after pretrain"] == {u: ["pretrain", "select"] for u in UNITS}
    bad = [f"shards={cfg.shards}", f"datasets.tiny.data.root={cfg.shards}", "stages=[pretrain,report]"]
    with pytest.raises(ConfigError, match=r"stages=\['pretrain', 'report'\]: choose"):
        load_config(SweepConfig, str(TINY), bad)


@pytest.mark.timeout(600)
def test_tiny_sweep_writes_report(sweep_run: tuple[SweepConfig, dict, dict]) -> None:
    cfg, paths, _ = sweep_run
    run = Path(cfg.out)
    df = pd.read_csv(run / "report.csv")
    assert sorted(zip(df["method"], df["ratio"], strict=True)) == [
        ("meddel", 0.25),
        ("meddel", 0.5),
        ("random", 0.25),
        ("random", 0.5),
        ("scratch", 0.0),
    ]
    assert df["done"].all() and (df["n_seeds"] == 2).all()
    n = 24
    for _, r in df[df.method != "scratch"].iterrows():
        # The leaked sample is removed first; the method keeps round(R * 23) of the rest.
        assert r["kept"] == round(r["ratio"] * (n - 1))
        # Two seeds: t(0.975, 1) = 12.7, so the interval may well leave [0, 1]; it is reported as computed.
        assert 0.0 <= r["miou_mean"] <= 1.0 and r["miou_ci_low"] <= r["miou_mean"] <= r["miou_ci_high"]
        # The same step budget for every cell: 6 steps of full batches of 4 images.
        assert r["pretrain_steps"] == 6 and r["images_seen"] == 24
    seeds = pd.read_csv(run / "report_seeds.csv")
    assert len(seeds) == 10 and sorted(set(seeds["seed"])) == [0, 1]
    for _, r in seeds[seeds.method != "scratch"].iterrows():
        assert r["normdel"] == pytest.approx(metrics.normdel(r["miou"], r["kept"] / n))
    md = (run / "report.md").read_text()
    assert md.index("Does pre-training help at all?") < md.index("## Protocol")
    assert "Pipeline demonstration" in md and "vs scratch" in md and "vs random" in md
    assert "[overlap/overlap.png](overlap/overlap.png)" in md
    names = sorted(Path(p).name for p in paths["plots"])
    assert names == ["miou_tiny.png", "normdel.png"]
    for p in paths["plots"]:
        assert Path(p).stat().st_size > 1000
    # Shared by every unit: one bootstrap, one embedding pass, one leakage check.
    assert json.loads((run / "embed" / "header.json").read_text())
    assert (run / "bootstrap" / ENCODER_WEIGHTS).is_file()
    overlap = json.loads((run / "overlap" / "summary.json").read_text())
    assert overlap["counts"]["tiny"]["files"] == 1 and overlap["excluded_pool_keys"] == 1
    for unit in ("random-r0.25/seed0", "meddel-r0.5/seed1"):
        rec = json.loads((run / "cells" / unit / "cell.json").read_text())
        assert rec["done"] and rec["seed"] == int(unit[-1])
        assert set(rec["stages"]) == {"select", "pretrain", "finetune/tiny"}
        assert all(s["wall_s"] > 0 for s in rec["stages"].values())
        sel = json.loads((run / "cells" / unit / "selection" / "summary.json").read_text())
        assert sel["method"] == unit.split("-")[0] and sel["config"]["seed"] == rec["seed"]
        assert sel["counts_by_reason"]["downstream_overlap"] == 1
    # Scratch: the same fine-tuning from a random encoder shaped like pretrain.encoder, per seed.
    rec = json.loads((run / "cells" / "scratch" / "seed1" / "cell.json").read_text())
    assert rec["done"] and set(rec["stages"]) == {"finetune/tiny"} and rec["kept"] == 0
    ft = yaml_of(run / "cells" / "scratch" / "seed1" / "finetune" / "tiny" / "config.yaml")
    assert ft["encoder"]["weights"] == "" and ft["encoder"]["allow_random_init"] is True
    assert (ft["encoder"]["depth"], ft["encoder"]["embed_dim"]) == (2, 64) and ft["seed"] == 1


def yaml_of(path: Path) -> dict:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.load(path))  # type: ignore[return-value]


def unit_files(run: Path) -> dict[Path, int]:
    return {p: p.stat().st_mtime_ns for p in (run / "cells").rglob("*") if p.is_file()}


@pytest.mark.timeout(300)
def test_rerun_skips_finished_cells(
    sweep_run: tuple[SweepConfig, dict, dict], caplog: pytest.LogCaptureFixture
) -> None:
    cfg, _, _ = sweep_run
    run = Path(cfg.out)
    units = sorted(p.parent for p in run.glob("cells/*/seed*/cell.json"))
    before = {u: (u / "cell.json").read_text() for u in units}
    mtimes = unit_files(run)
    logger = logging.getLogger("dataeff")
    logger.addHandler(caplog.handler)
    try:
        with caplog.at_level(logging.INFO, logger="dataeff"):
            main(cfg)
    finally:
        logger.removeHandler(caplog.handler)
    skipped = {r.getMessage().split()[2] for r in caplog.records if "is done" in r.getMessage()}
    assert skipped == {f"{u.parent.name}/{u.name}" for u in units} and len(skipped) == 10
    assert {u: (u / "cell.json").read_text() for u in units} == before
    # Nothing inside a unit was rewritten: no stage ran again.
    assert unit_files(run) == mtimes


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
    cells = sorted(Path(cfg.out).glob("cells/*/seed*/cell.json"))
    assert len(cells) == 10
    before = [c.read_text() for c in cells]
    main(same_sweep(cfg, "select.sam.points_per_side=3", "select.semdedup.epsilon=0.2"))
    assert [c.read_text() for c in cells] == before
    with pytest.raises(ConfigError, match="other settings"):  # MedDEL's own keys still count for its cells
        main(same_sweep(cfg, "select.meddel.blur_var=81.0"))


def test_config_errors(tmp_path: Path) -> None:
    # An old config's single seed fails, naming what replaced it.
    with pytest.raises(ConfigError, match=r"unknown config key 'seed'.*replaced by seeds"):
        load_stage_config(SweepConfig, str(TINY), ["shards=x", "seed=0"])
    with pytest.raises(ConfigError, match="seeds"):
        load_config(SweepConfig, str(TINY), ["shards=x", "datasets.t.data.root=x", "seeds=[1,1]"])
    with pytest.raises(ConfigError, match="shards is empty"):
        load_config(SweepConfig, str(TINY), [])
    with pytest.raises(ConfigError, match="methods"):
        load_config(SweepConfig, str(TINY), ["shards=x", "methods=[nope]"])
    with pytest.raises(ConfigError, match="ratios"):
        load_config(SweepConfig, str(TINY), ["shards=x", "ratios=[5]"])
    # Keys the sweep fills in every cell are not in its templates.
    for key in ("select.out", "select.exclude", "embed.data.shards", "pretrain.seed", "finetune.encoder.weights"):
        # finetune.encoder is filled whole (the unit's encoder), so the error names the section.
        with pytest.raises(ConfigError, match=f"unknown config key '{key.removesuffix('.weights')}'"):
            load_config(
                SweepConfig, str(TINY), [f"shards={tmp_path}", f"datasets.tiny.data.root={tmp_path}", f"{key}=x"]
            )


def test_plan_cells_protocol() -> None:
    methods = ["full", "random", "meddel", "optidel", "scratch"]
    cells, skipped = plan_cells(methods, [0.5, 0.05, 1.0], {"optidel": "no SAM"})
    assert [c.name for c in cells] == [
        "full-r1",
        "random-r0.05",
        "random-r0.5",
        "meddel-r0.05",
        "meddel-r0.5",
        "meddel-r1",
        "scratch",
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


def test_plan_units_share_the_embedding_and_fill_scratch(tmp_path: Path) -> None:
    cfg = load_config(
        SweepConfig, str(TINY), [f"shards={tmp_path}", f"datasets.tiny.data.root={tmp_path}", "seeds=[3,5]"]
    )
    full = plan(cfg, str(tmp_path), "")
    names = [u.name for u, _ in full["units"]]
    assert names[:5] == [
        f"{c}/seed3" for c in ("random-r0.25", "random-r0.5", "meddel-r0.25", "meddel-r0.5", "scratch")
    ]
    assert len(names) == 10
    assert full["embed"].seed == cfg.bootstrap.seed == 0  # shared stages never take a unit's seed
    assert full["overlap"].out == str(Path(cfg.out) / "overlap") and full["overlap"].signals == ["exact", "phash"]
    for unit, c in full["units"]:
        ft = c["finetune"]["tiny"]
        assert ft.seed == unit.seed
        if unit.cell.method == "scratch":
            assert c["select"] is None and c["pretrain"] is None
            assert ft.encoder.weights == "" and ft.encoder.allow_random_init
            assert (ft.encoder.depth, ft.encoder.embed_dim, ft.encoder.img_size) == (2, 64, 32)
        else:
            assert c["select"].exclude == full["overlap"].out and c["select"].seed == unit.seed
            assert c["pretrain"].seed == unit.seed and ft.encoder.weights == c["pretrain"].out
    off = load_config(
        SweepConfig, str(TINY), [f"shards={tmp_path}", f"datasets.tiny.data.root={tmp_path}", "overlap.enabled=false"]
    )
    full = plan(off, str(tmp_path), "")
    assert full["overlap"] is None and all(c["select"] is None or c["select"].exclude == "" for _, c in full["units"])


@pytest.mark.timeout(300)
def test_adding_a_seed_reuses_finished_seeds_and_shared_stages(sweep_run: tuple[SweepConfig, dict, dict]) -> None:
    """Runs last (it adds a unit): seeds=[0,1,2] runs only the new seed; nothing finished is touched."""
    cfg, _, _ = sweep_run
    run = Path(cfg.out)
    shared = [run / "embed" / "header.json", run / "overlap" / "summary.json", run / "bootstrap" / "stage.json"]
    mtimes = unit_files(run) | {p: p.stat().st_mtime_ns for p in shared}
    main(same_sweep(cfg, "seeds=[0,1,2]", "methods=[random]", "ratios=[0.25]", "report=false"))
    assert json.loads((run / "cells" / "random-r0.25" / "seed2" / "cell.json").read_text())["done"]
    after = unit_files(run) | {p: p.stat().st_mtime_ns for p in shared}
    assert {p: t for p, t in after.items() if p in mtimes} == mtimes
    assert all("seed2" in p.parts for p in set(after) - set(mtimes))
