"""report.md for a low-label, frozen-encoder sweep: the protocol says so, and the papers' questions are answered."""

from __future__ import annotations

import json
from pathlib import Path

from dataeff.report import ReportConfig, main
from tests.integration.test_report import NOWB, make_sweep


def test_protocol_names_label_draws_and_frozen_encoder_and_claims_are_answered(tmp_path: Path) -> None:
    run = make_sweep(tmp_path / "sweep")
    plain = Path(main(ReportConfig(run=str(run), plots=False, wandb=NOWB))["md"]).read_text()
    assert "Labels: each run" not in plain and "frozen encoder" not in plain
    for results in run.glob("cells/*/seed*/finetune/a/results.json"):
        res = json.loads(results.read_text())
        results.write_text(json.dumps({**res, "n_train": 20, "label_draw": True, "encoder_frozen": True}))
    md = Path(main(ReportConfig(run=str(run), plots=False, wandb=NOWB))["md"]).read_text()
    assert "Labels: each run fine-tunes on a draw of 20 labelled training pairs" in md
    assert "Evaluation on a: frozen encoder (`freeze_encoder`)" in md
    questions = md.split("### The papers' questions")[1].split("### Paired comparisons")[0]
    # full beats scratch in this sweep; MedDEL 5% is worse than full beyond the CI (test_report's numbers).
    assert "full vs scratch: +10.3 mIoU [+8.9, +11.8]: better beyond the 95% CI" in questions
    assert "MedDEL 5% was worse than full beyond the CI (by 3.4 to 16.6 points): no match." in questions
    assert "random 5% is not distinguishable from full" not in questions  # random 5% vs full: worse too
