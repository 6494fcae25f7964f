"""OptiDEL: V-information selection of SAM-generated hard patches, composed into mosaics.

PAPERS.md, "OptiDEL": maximising predictive V-information ``H_V(Y|0) - H_V(Y|X)`` asks
for samples that are *hard* (the model is unsure: high MAE reconstruction loss) and
*diverse* (they span the data: ours, a cap per embedding cluster and per source image).
The pipeline is SAM patches (``sam_hard.py``) -> hardness -> top-N hardest under the
caps -> 2x2 mosaics (``compose.py``), N = 4 * round(R * |D|). Invalid frames (MedDEL's
quality rules, ``meddel.quality_checks`` and thresholds) never reach SAM.

Hardness, two definitions (the paper names the MAE loss and is silent on the rest; ours):

- ``mae_loss`` (default): the scorer's MAE reconstruction loss of the patch, averaged
  over ``hardness_masks`` = K fixed random masks (:func:`mask_seeds`). One mask scores
  a patch by which 75 % of it happened to be hidden; averaging K masks lowers that
  variance (about 1/K) while staying reproducible and independent of the world size.
- ``prototype_distance``: Sorscher et al. 2022's self-supervised prototype metric:
  each patch is embedded by the scorer's encoder (mean of its patch tokens), k-means
  (spherical faiss, seeded, k = round(sqrt(P))) runs over all P patch embeddings, and
  hardness = cosine distance to the nearest centroid (far from every prototype = hard).

This file holds the config and the pure core (selection, mosaic assignment, coverage);
the distributed shell (SAM + scoring per shard, gathering, composition) is
``optidel_run.py``, registered as the select stage's ``optidel`` method.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, get_args

import numpy as np

from dataeff.config import ConfigError, option
from dataeff.select.compose import PATCHES_PER_MOSAIC
from dataeff.select.manifest import target_count
from dataeff.select.sam_hard import SamConfig, check_checkpoint

log = logging.getLogger("dataeff")

#: Hardness definitions (module docstring).
Hardness = Literal["mae_loss", "prototype_distance"]
HARDNESS_NAMES: tuple[str, ...] = get_args(Hardness)


@dataclass
class OptidelConfig:
    """OptiDEL selection and composition (all defaults are ours; the paper is silent)."""

    include_originals: bool = option(
        False, help="also keep the hardest original images; they take optidel.originals_fraction of the budget"
    )
    originals_fraction: float = option(
        0.5, help="with include_originals: share of the round(R*|D|) budget given to originals (rest = mosaics)"
    )
    max_per_image: int = option(4, help="diversity cap: at most this many selected patches per source image")
    cluster_cap_factor: float = option(
        2.0, help="diversity cap per embedding cluster: ceil(factor * N / clusters) patches (0 = no cluster cap)"
    )
    hardness: Hardness = option(
        "mae_loss",
        help="patch hardness: mae_loss (MAE reconstruction loss, mean over hardness_masks masks) or "
        "prototype_distance (cosine distance of the scorer's embedding to the nearest k-means prototype)",
    )
    hardness_masks: int = option(
        4, help="mae_loss: average the loss over this many fixed random masks (1 = a single mask, mask_seed)"
    )
    mask_seed: int = option(0, help="mae_loss: seed of the first mask; the others derive from it (reproducible)")
    batch_size: int = option(32, help="patches per MAE scoring batch")
    mosaics_per_shard: int = option(256, help="mosaics per generated tar shard (also the composition work unit)")

    def __post_init__(self) -> None:
        if not 0.0 <= self.originals_fraction <= 1.0:
            raise ConfigError(f"optidel.originals_fraction={self.originals_fraction}: must be in [0, 1]")
        if self.max_per_image < 1:
            raise ConfigError(f"optidel.max_per_image={self.max_per_image}: must be at least 1")
        if self.cluster_cap_factor < 0:
            raise ConfigError(f"optidel.cluster_cap_factor={self.cluster_cap_factor}: must be >= 0 (0 = off)")
        if self.hardness not in HARDNESS_NAMES:
            raise ConfigError(f"optidel.hardness={self.hardness!r}: choose one of {', '.join(HARDNESS_NAMES)}")
        if self.hardness_masks < 1:
            raise ConfigError(f"optidel.hardness_masks={self.hardness_masks}: must be at least 1 (1 = one mask)")
        if self.batch_size < 1 or self.mosaics_per_shard < 1:
            raise ConfigError("optidel.batch_size and optidel.mosaics_per_shard must be at least 1")


def mask_seeds(mask_seed: int, count: int) -> list[int]:
    """Seeds of the ``count`` fixed MAE masks a patch is scored under.

    The first is ``mask_seed`` itself (so K = 1 scores exactly as a single mask did); the
    others are well-mixed 63-bit seeds of (mask_seed, j), the same on every rank and run.
    """
    extra = [
        int(np.random.SeedSequence([mask_seed & 0xFFFFFFFF, j]).generate_state(2, np.uint64)[0]) >> 1
        for j in range(1, count)
    ]
    return [int(mask_seed), *extra]


def budget(ratio: float, pool_size: int, include_originals: bool, originals_fraction: float) -> tuple[int, int]:
    """(mosaics, originals) for a selection ratio: together round(R * |D|) new pre-training images.

    Keeping the total at round(R * |D|) keeps NormDEL's R honest when originals are added.
    The count is the select stage's (half up, at least 1), so every method keeps the same number.
    """
    total = target_count(ratio, pool_size)
    originals = int(round(originals_fraction * total)) if include_originals else 0
    return total - originals, originals


def cluster_cap(n: int, n_clusters: int, factor: float) -> int:
    """Per-cluster cap for ``n`` selections over ``n_clusters`` clusters (0 = no cap)."""
    if factor <= 0 or n_clusters <= 0:
        return 0
    return max(1, math.ceil(factor * n / n_clusters))


def select_hardest(
    scores: np.ndarray,
    sources: np.ndarray,
    clusters: np.ndarray,
    n: int,
    max_per_image: int,
    max_per_cluster: int,
) -> tuple[np.ndarray, np.ndarray]:
    """The ``n`` hardest records under the diversity caps, as a pure function of the arrays.

    Greedy by decreasing score (ties: lower row first, rows being key-sorted). Pass 0
    applies both caps; when the caps leave fewer than ``n``, pass 1 drops the cluster cap
    and pass 2 the image cap, so the budget is met whenever there are ``n`` records.

    Shape:
        scores, sources, clusters: (P,) (cluster -1 = unknown, never capped) ->
        selected rows (K,) int64 in selection order, pass of each (K,) int8, K = min(n, P).
    """
    if np.isnan(scores).any():
        raise ValueError("hardness scores contain NaN: the scoring model diverged")
    order = np.argsort(-scores.astype(np.float64), kind="stable")
    taken = np.zeros(len(scores), dtype=bool)
    per_image: dict[str, int] = {}
    per_cluster: dict[int, int] = {}
    chosen: list[int] = []
    passes: list[int] = []
    limits = [(max_per_image, max_per_cluster), (max_per_image, 0), (0, 0)]
    for p, (image_cap, c_cap) in enumerate(limits):
        for i in order:
            if len(chosen) >= n:
                break
            if taken[i]:
                continue
            src, cl = str(sources[i]), int(clusters[i])
            if image_cap and per_image.get(src, 0) >= image_cap:
                continue
            if c_cap and cl >= 0 and per_cluster.get(cl, 0) >= c_cap:
                continue
            taken[i] = True
            chosen.append(int(i))
            passes.append(p)
            per_image[src] = per_image.get(src, 0) + 1
            per_cluster[cl] = per_cluster.get(cl, 0) + 1
    return np.asarray(chosen, dtype=np.int64), np.asarray(passes, dtype=np.int8)


def assign_mosaics(selected: np.ndarray, sources: np.ndarray, clusters: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """Group selected records 4 by 4 into mosaics that mix sources and clusters.

    The selected rows are ordered by (cluster, source, hardness) and mosaic k takes
    positions k, k+M, k+2M, k+3M (M mosaics): neighbours in that order (same cluster,
    same image) land in different mosaics, and each mosaic draws from four quarters of
    the cluster range. ``len(selected)`` must be a multiple of 4.

    Shape:
        selected: (4M,) row ids -> (M, 4) row ids, quadrant order TL, TR, BL, BR.
    """
    if len(selected) % PATCHES_PER_MOSAIC:
        raise ValueError(f"{len(selected)} selected patches: not a multiple of {PATCHES_PER_MOSAIC}")
    m = len(selected) // PATCHES_PER_MOSAIC
    order = np.lexsort((selected, -scores[selected], sources[selected], clusters[selected]))
    return selected[order].reshape(PATCHES_PER_MOSAIC, m).T.copy()


def coverage(selected_clusters: np.ndarray, all_clusters: np.ndarray) -> dict[str, float]:
    """Clusters represented in the selection / clusters present in the pool (-1 ignored)."""
    pool = set(int(c) for c in np.unique(all_clusters) if c >= 0)
    hit = set(int(c) for c in np.unique(selected_clusters) if c >= 0) & pool
    return {
        "clusters_represented": len(hit),
        "clusters_total": len(pool),
        "cluster_coverage": (len(hit) / len(pool)) if pool else float("nan"),
    }


def check_inputs(sam: SamConfig, scorer: str) -> None:
    """Fail at config time, before any work, when OptiDEL's two models are not at hand.

    Raises:
        ConfigError: no SAM checkpoint (naming the file to download), or no scorer.
    """
    check_checkpoint(sam)
    if not scorer:
        raise ConfigError(
            "method=optidel needs scorer=<pre-trained MAE>: the output directory of 'dataeff pretrain' "
            "(or its mae.ckpt); a short pretrain run on the pool bootstraps one (PAPERS.md, OptiDEL step 2)"
        )
    if not Path(scorer).exists():
        raise ConfigError(
            f"scorer={scorer}: no such file or directory (expected a 'dataeff pretrain' output or its mae.ckpt)"
        )
    if sam.model == "tiny" and (sam.pred_iou_thresh > 0 or sam.stability_score_thresh > 0):
        log.warning(
            "sam.model=tiny with pred_iou_thresh/stability_score_thresh > 0 usually yields no masks; "
            "configs/select/optidel_tiny.yaml sets both to 0"
        )
