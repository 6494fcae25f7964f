"""configs/sweep/fidelity.yaml (`make fidelity`) loads and plans the expected units: no training."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from dataeff.config import load_config
from dataeff.sweep_plan import SweepConfig, encoder_paths, plan

REPO = Path(__file__).resolve().parents[2]
FIDELITY = REPO / "configs" / "sweep" / "fidelity.yaml"


def test_fidelity_sweep_plans_every_method_at_5_and_20_percent_in_the_low_label_regime() -> None:
    cfg = load_config(SweepConfig, str(FIDELITY))
    assert len(cfg.seeds) >= 3 and cfg.select.audit.truth == "demo/pool_truth.csv" and cfg.shards == "shards/demo-pool"
    planned = plan(cfg, *encoder_paths(cfg), precheck=True)
    assert planned["skipped"] == []  # optidel runs with the tiny SAM; no ratio 1.0, so no random-r1
    cells = Counter(unit.cell.name for unit, _ in planned["units"])
    expected = {"full-r1", "scratch"} | {
        f"{m}-r{r}" for m in ("random", "meddel", "semdedup", "optidel") for r in (0.05, 0.2)
    }
    assert set(cells) == expected and set(cells.values()) == {len(cfg.seeds)}
    for unit, stage in planned["units"]:
        tuned = stage["finetune"]["kvasir-demo"]
        assert 0 < tuned.data.n_train < 140 and tuned.seed == unit.seed and not tuned.freeze_encoder
        if unit.cell.method != "scratch":
            assert stage["pretrain"].trainer.max_steps == cfg.pretrain.trainer.max_steps
    optidel = next(stage["select"] for unit, stage in planned["units"] if unit.cell.method == "optidel")
    assert optidel.sam.model == "tiny"  # labelled in the report as a random tiny SAM
