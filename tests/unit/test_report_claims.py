"""The papers' questions in the report: paired differences against full, read in plain words."""

from __future__ import annotations

import pandas as pd

from dataeff.report_claims import QUESTIONS, Question, answer, claim_lines
from dataeff.report_table import comparisons

# mIoU per seed 0, 1, 2; full beats scratch clearly.
CELLS = {
    ("scratch", 0.0): [0.50, 0.52, 0.51],
    ("full", 1.0): [0.60, 0.62, 0.61],
    ("meddel", 0.05): [0.60, 0.61, 0.615],  # close to full
    ("meddel", 0.2): [0.50, 0.51, 0.515],  # clearly worse than full
    ("random", 0.05): [0.61, 0.60, 0.62],
    ("optidel", 0.05): [0.63, 0.64, 0.635],  # clearly better than full
}


def _seeds(cells: dict) -> pd.DataFrame:
    rows = [
        {"dataset": "a", "method": m, "ratio": r, "seed": s, "miou": v}
        for (m, r), values in cells.items()
        for s, v in enumerate(values)
    ]
    return pd.DataFrame(rows)


def test_each_claim_gets_its_reading():
    lines = claim_lines(comparisons(_seeds(CELLS)), "a")
    text = "\n".join(lines)
    assert lines[0].startswith("- full vs scratch: +10.0 mIoU") and "better beyond the 95% CI" in lines[0]
    assert "cannot tell" not in text
    assert "MedDEL 5% is not distinguishable from full" in text and "admits a loss of up to" in text
    assert "MedDEL 20% was worse than full beyond the CI" in text
    assert "OptiDEL 5% beat full beyond the CI" in text and "the claim holds here" in text
    # random 20% is not in the sweep: not asked
    assert "random 20%" not in text and "random 5% is not distinguishable from full" in text


def test_without_a_pretraining_effect_the_answers_are_flagged():
    cells = {**CELLS, ("scratch", 0.0): [0.61, 0.60, 0.63]}
    text = "\n".join(claim_lines(comparisons(_seeds(cells)), "a"))
    assert "Full pre-training did not beat scratch beyond the CI, so these comparisons cannot tell" in text
    # OptiDEL still beats full, but that cannot carry the claim when full beats nothing.
    assert "OptiDEL 5% beat full beyond the CI" in text and "the claim holds here" not in text
    assert "full itself did not beat scratch, so this does not support the claim" in text


def test_no_full_cell_and_single_seed():
    no_full = {k: v for k, v in CELLS.items() if k[0] != "full"}
    assert "None of the papers' cells" in "\n".join(claim_lines(comparisons(_seeds(no_full)), "a"))
    row = {"ci_low": float("nan"), "ci_high": float("nan"), "diff_mean": 0.01}
    assert "no interval: unanswered" in answer(Question("meddel", 0.05, "match"), row)
    assert [q.method for q in QUESTIONS].count("optidel") == 1
