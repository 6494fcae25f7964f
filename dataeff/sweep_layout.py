"""Where a sweep puts things: the names the sweep writes and the report reads, defined once.

No imports beyond the standard library, so the report (and the SLURM planner) can use
them without loading torch or any stage.

Layout under a sweep's ``out``::

    sweep.json                                plan: cells, seeds, skipped cells and why, budget
    bootstrap/  embed/  overlap/              shared by every cell and every seed
    cells/<method>-r<ratio>/seed<k>/          selection/, pretrain/, finetune/<dataset>/, cell.json
    cells/scratch/seed<k>/                    finetune/<dataset>/, cell.json (no pre-training)
    report.md  report.csv  report_seeds.csv  report_comparisons.csv  plots/
"""

from __future__ import annotations

import re

#: Pseudo-method of the sweep: fine-tune a randomly initialised encoder (no pre-training at all).
SCRATCH = "scratch"
#: Shared directories of a sweep (one of each for all cells and seeds).
BOOTSTRAP_DIR = "bootstrap"
EMBED_DIR = "embed"
OVERLAP_DIR = "overlap"
CELLS_DIR = "cells"
SWEEP_JSON = "sweep.json"
#: Report outputs.
REPORT_MD = "report.md"
REPORT_CSV = "report.csv"
REPORT_SEEDS_CSV = "report_seeds.csv"
REPORT_COMPARISONS_CSV = "report_comparisons.csv"
PLOTS_DIR = "plots"

_SEED_DIR = re.compile(r"^seed(\d+)$")


def cell_name(method: str, ratio: float) -> str:
    """``<method>-r<ratio>`` (``meddel-r0.05``); the scratch baseline has no ratio: ``scratch``."""
    return SCRATCH if method == SCRATCH else f"{method}-r{ratio:g}"


def seed_dir(seed: int) -> str:
    """Directory of one seed of a cell: ``seed<k>``."""
    return f"seed{seed}"


def seed_of(name: str) -> int | None:
    """The seed of a ``seed<k>`` directory name, None for any other name."""
    match = _SEED_DIR.match(name)
    return int(match.group(1)) if match else None
