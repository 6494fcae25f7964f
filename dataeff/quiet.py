"""Third-party output a dataeff user cannot act on, muted at its source in one place.

``dataeff <stage>`` runs inside :func:`quiet_third_party`; ``dataeff -v <stage>`` does not,
and then shows every line. dataeff's own log lines and progress bars are never touched.
Each entry matches one message precisely (a regex anchored at its start), so a new or
actionable warning from the same library still shows.

Fixed where they are made instead (in :mod:`dataeff.trainer`, whatever the flag): wandb's
"The anonymous setting has no effect" (the W&B logger no longer passes the setting) and
Lightning's "`weights_only` was not set" (the final checkpoint says what it saves).
"""

from __future__ import annotations

import contextlib
import logging
import re
import warnings
from collections.abc import Iterator

#: ``warnings`` messages (regexes matched at the start), with why each one is noise here.
WARNING_MESSAGES: tuple[str, ...] = (
    # torch deprecates LeafSpec and Lightning's own pytree helper still uses it: nothing to change on our side.
    r"`isinstance\(treespec, LeafSpec\)` is deprecated",
    # The pre-training stream plans every worker's share itself (data/stream.py), so its length is exact.
    r"Your `IterableDataset` has `__len__` defined",
    # Logging counts optimiser steps across epochs; a short epoch (small fine-tuning set) loses no rows.
    r"The number of training batches \(\d+\) is smaller than the logging interval",
    # The run directory holds metrics.csv and checkpoints/ on purpose, and again when a run resumes.
    r"Experiment logs directory .* exists and is not empty",
    r"Checkpoint directory .* exists and is not empty",
    # A host with SLURM's client tools: a stage started by torchrun, a SLURM script's srun or by hand is
    # launched as intended (dataeff's "trainer:" line says what runs where).
    r"The `srun` command is available on your system but is not used",
)

#: Lightning info lines (``rank_zero_info``), matched at the start of the message.
LIGHTNING_INFO = re.compile(
    r"💡 Tip:"  # advertisements for litlogger / litmodels
    r"|GPU available: |TPU available: |HPU available: "  # dataeff's "trainer:" line says what runs where
    r"|`Trainer\.fit` stopped: `max_steps=\d+` reached"  # the stage logs its own end (steps, images, outputs)
)

#: Where Lightning logs those lines: the standalone package, the unified one, and Fabric.
LIGHTNING_LOGGERS: tuple[str, ...] = (
    "pytorch_lightning.utilities.rank_zero",
    "lightning.pytorch.utilities.rank_zero",
    "lightning_fabric.utilities.rank_zero",
)


class _DropLightningInfo(logging.Filter):
    """Drops the :data:`LIGHTNING_INFO` lines; every other record (warnings included) passes."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno > logging.INFO or not LIGHTNING_INFO.match(record.getMessage())


@contextlib.contextmanager
def quiet_third_party(verbose: bool = False) -> Iterator[None]:
    """Within the block, mute :data:`WARNING_MESSAGES` and :data:`LIGHTNING_INFO`; undone on exit.

    Args:
        verbose: change nothing (``dataeff -v``): the warnings filters and loggers stay as they are.
    """
    if verbose:
        yield
        return
    drop = _DropLightningInfo()
    loggers = [logging.getLogger(name) for name in LIGHTNING_LOGGERS]
    # catch_warnings restores the filter list on exit, so a test (or a caller) calling the
    # CLI in-process gets its own filters back.
    with warnings.catch_warnings():
        for message in WARNING_MESSAGES:
            warnings.filterwarnings("ignore", message=message)
        for logger in loggers:
            logger.addFilter(drop)
        try:
            yield
        finally:
            for logger in loggers:
                logger.removeFilter(drop)
