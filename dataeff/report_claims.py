"""The papers' questions, answered from a sweep's paired comparisons: pure, no I/O.

MedDEL (arXiv 2401.17542) claims that 5% of the pool matches the full pool; OptiDEL
(arXiv 2408.07107) that its 5% subset beats the full pool. Each question is one paired
difference against ``full`` (from :func:`dataeff.report_table.comparisons`) with its
interval and a plain sentence. A "match" is never declared from a non-significant test:
the sentence states the largest loss the interval still admits. All of it is conditional
on full pre-training beating ``scratch``: when it does not, the sweep cannot tell data
apart and the answer says so first.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import pandas as pd

from dataeff.report_table import display_name
from dataeff.sweep_layout import SCRATCH


class Question(NamedTuple):
    """One claim: ``method`` at ``ratio`` against full, and what the paper says of it."""

    method: str
    ratio: float
    claim: str  # "match" (no worse than full) or "beat" (better than full)


#: The papers' headline claims, in the order the report asks them (random: the control).
QUESTIONS = (
    Question("meddel", 0.05, "match"),
    Question("meddel", 0.2, "match"),
    Question("random", 0.05, "match"),
    Question("random", 0.2, "match"),
    Question("optidel", 0.05, "beat"),
)


def _row(comps: pd.DataFrame, dataset: str, method: str, ratio: float, versus: str) -> dict[str, Any] | None:
    hit = comps[
        (comps["dataset"] == dataset)
        & (comps["method"] == method)
        & (comps["ratio"].sub(ratio).abs() < 1e-9)
        & (comps["versus"] == versus)
    ]
    return None if hit.empty else hit.iloc[0].to_dict()


def _points(value: float) -> str:
    return f"{abs(value) * 100:.1f}"


def answer(question: Question, row: dict[str, Any], full_beat_scratch: bool = True) -> str:
    """The plain reading of one paired difference ``row`` (a :func:`comparisons` row, fractions).

    ``full_beat_scratch`` false: a subset beating full beats no pre-training at most, so it
    cannot support the claim.
    """
    name = display_name(question.method, question.ratio)
    low, high, mean = float(row["ci_low"]), float(row["ci_high"]), float(row["diff_mean"])
    if math.isnan(low):
        return f"{name}: fewer than 2 paired seeds, no interval: unanswered."
    if question.claim == "beat":
        if low > 0:
            verdict = (
                "the claim holds here"
                if full_beat_scratch
                else "but full itself did not beat scratch, so this does not support the claim"
            )
            return f"{name} beat full beyond the CI (by {_points(low)} to {_points(high)} points): {verdict}."
        if high < 0:
            return f"{name} was worse than full beyond the CI: the claim fails here."
        return f"{name} did not beat full beyond the CI (interval contains 0): the claim is not supported here."
    if high < 0:
        return f"{name} was worse than full beyond the CI (by {_points(-high)} to {_points(-low)} points): no match."
    if low > 0:
        return f"{name} beat full beyond the CI: at least as good as full."
    loss = f"a loss of up to {_points(-low)} points" if low < 0 else "no loss"
    return (
        f"{name} is not distinguishable from full (mean {mean * 100:+.1f}); the interval still admits {loss}, "
        "so it matches full only to within that margin."
    )


def claim_lines(comps: pd.DataFrame, dataset: str) -> list[str]:
    """Markdown bullets: full vs scratch first (the precondition), then each paper claim in the sweep."""
    gate = _row(comps, dataset, "full", 1.0, SCRATCH)
    out = []
    full_beat_scratch = gate is None or float(gate["ci_low"]) > 0
    if gate is None:
        out.append("- Full pre-training vs scratch: not in this sweep; the answers below are unconditioned.")
    else:
        out.append(f"- {gate['sentence']}.")
        if not full_beat_scratch:
            out.append(
                "- **Full pre-training did not beat scratch beyond the CI, so these comparisons cannot tell "
                "pre-training data apart**: a subset 'matching' full here matches no pre-training too."
            )
    asked = 0
    for question in QUESTIONS:
        row = _row(comps, dataset, question.method, question.ratio, "full")
        if row is None:
            continue
        asked += 1
        out.append(f"- {row['sentence']}. {answer(question, row, full_beat_scratch)}")
    if not asked:
        out.append("- None of the papers' cells (MedDEL, random at 5%/20%; OptiDEL at 5%) ran with `full`.")
    return [*out, ""]
