"""Low-label fine-tuning: a seeded draw of ``n`` labelled training pairs from the train split.

Self-supervised pre-training shows most where labels are few, so a fidelity protocol
fine-tunes on a small labelled subset and repeats it over several draws. The draw depends
only on ``(pairs, n, seed)``: units of a sweep that share a seed train on the same pairs,
which is what pairing their results by seed needs. Pure; no I/O.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

import numpy as np

from dataeff.config import ConfigError

T = TypeVar("T")


def draw_labelled(pairs: Sequence[T], n: int, seed: int) -> list[T]:
    """``n`` of ``pairs`` chosen without replacement by a ``seed``-seeded generator, in their given order.

    ``n = 0`` keeps every pair. The choice is a prefix of one seeded permutation, so a
    larger ``n`` with the same seed keeps every pair a smaller one kept.

    Raises:
        ConfigError: ``n`` is negative or larger than the train split.
    """
    if n < 0:
        raise ConfigError(f"data.n_train={n}: must be >= 0 (0 = every training pair)")
    if n == 0:
        return list(pairs)
    if n > len(pairs):
        raise ConfigError(f"data.n_train={n}: the train split has only {len(pairs)} pairs; lower data.n_train")
    order = np.random.default_rng(seed).permutation(len(pairs))[:n]
    return [pairs[i] for i in sorted(order.tolist())]
