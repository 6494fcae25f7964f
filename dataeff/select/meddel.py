"""MedDEL: drop invalid and disruptive samples, then redundant ones, to an exact ratio.

Pure numpy over key-sorted arrays (no I/O, no collectives); the shell
(``meddel_run.py``, with ``distributed_cluster.py``) runs :func:`cluster_redundancy`
on the clusters a rank owns and :func:`decide` on the gathered results. Steps follow
PAPERS.md "MedDEL":

1. quality (step 5, our rule): frames that are dark, blank, over-exposed or blurred
   by the statistics the shard stage recorded (index.parquet), each switchable;
2. embedding outliers (step 5, our rule): cosine distance to the centroid above a
   quantile of all distances -> ``outlier``; clusters with fewer valid members than
   a minimum -> ``small_cluster``;
3. redundancy (step 3): inside each cluster, members visited farthest-from-centroid
   first ("hard"; "easy" and "random" as options); member j is redundant when its
   cosine similarity to an earlier member exceeds 1 - eps (SemDeDup's rule, so the
   kept count is monotone in eps);
4. eps by bisection (step 4) so that exactly round(R*N) samples are kept: the kept
   count is a step function of each member's largest similarity to an earlier one,
   so the bisection runs over those sorted similarities and is exact; the few extra
   rows tied at the cut are the only ones trimmed when too many survive (cluster-
   balanced among them); every row below the cut is kept. A redundant member records
   the earlier member it duplicates (``redundant_of:<key>``): with the default order
   the member farther from the centroid of a near-duplicate pair stays.

The scan in step 3 costs O(s^2 D) for a cluster of s members, O(sum s^2) over the
pool: with a fixed k, 10x rows make it 100x. ``max_scan_rows`` (default 4096; 0 =
exact) bounds it: a cluster with more valid members is cut in two along its top
principal direction (float64 power iteration from a start vector seeded by (seed,
cluster id)) at the widest gap near the median, recursively, into leaves of at most
that many rows; each member is compared only with the earlier members of its leaf, in
the cluster's visiting order, so the cost is O(N * bound). Near-duplicates project
close together and nearly always share a leaf; a pair cut apart is missed (its later
member keeps its best in-leaf similarity, a lower bound of the exact one). With the
default k = round(sqrt(N)) clusters average sqrt(N) members, so only pools with
clusters above 4096 members (on average from N ~ 1.7e7) reach the bound.

Our addition, off by default (``phash``; the paper has no such signal): inside each
cluster, a member whose shard-time perceptual hash is within ``phash_max_distance``
bits of an earlier member's and whose 16 x 16 thumbnail correlates with it at least
``min_thumb_corr`` is a copy of that member whatever the embedding says: its
similarity is raised to 1.0, so it goes first, and its reason names that member.
A weak encoder scatters brightness-shifted and re-encoded copies of one frame
(docs/selection.md); the signature comparison stays inside the cluster (inside the
scan leaf when the cluster is split), so the cost stays ~N^1.5.

Our second addition, off by default (``near_copies``): a pool-wide pass over the same
thumbnails (``near_copies.py``: nearest neighbours of each thumbnail and of its zoomed
versions, confirmed by a zoom- and shift-tolerant correlation, grouped by union-find)
removes every member of a near-copy group but its sharpest before clustering, like an
invalid frame, with ``redundant_of:<key>`` naming the member it copies. It finds the
copies a weak encoder puts in another cluster, which no within-cluster rule can.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from dataeff.config import ConfigError, option
from dataeff.constants import QUALITY_REASONS, REASON_CODES
from dataeff.data.signatures import MIN_THUMB_CORR, PHASH_MAX_DISTANCE, popcount64
from dataeff.select.near_copies import COPY_K, MIN_COPY_CORR

ORDERS = ("hard", "easy", "random")
#: Similarity-matrix elements per block in :func:`max_earlier_similarity` (64 MB of float32).
_BLOCK_ELEMS = 1 << 24
#: Power iterations per leaf split: the direction need not converge, only spread the rows.
_POWER_ITERATIONS = 8
#: Rows (at most) of the strided sample a leaf split's direction is computed from.
_DIRECTION_ROWS = 1024
#: Third word of the split's start-vector seed, apart from the random visit order's stream.
_SPLIT_STREAM = 1


@dataclass
class MedDELConfig:
    """MedDEL thresholds; every default is dataeff's choice (the paper gives none)."""

    quality_checks: list = option(
        list(QUALITY_REASONS), help="invalid-frame checks to apply: any of dark, overexposed, blank, blurred"
    )
    dark_mean: float = option(25.0, help="dark: mean gray level (0-255, 128-px thumbnail) below this")
    dark_frac: float = option(0.8, help="dark: or fraction of pixels < 16 above this")
    overexposed_mean: float = option(200.0, help="overexposed: mean gray level above this")
    overexposed_frac: float = option(0.2, help="overexposed: or fraction of pixels > 240 above this")
    blank_std: float = option(8.0, help="blank: gray-level standard deviation below this")
    blur_var: float = option(80.0, help="blurred: variance of the 3x3 Laplacian below this")
    outlier_quantile: float = option(
        0.99, help="outlier: cosine distance to the centroid above this quantile of all distances (1.0 = off)"
    )
    min_cluster_size: int = option(3, help="small_cluster: clusters with fewer valid members are dropped (<=1 = off)")
    order: str = option("hard", help="visit order inside a cluster: hard (farthest first), easy, random")
    epsilon: float | None = option(
        None, help="fixed redundancy eps (similarity > 1-eps); null = bisection to the target ratio (paper)"
    )
    phash: bool = option(
        False,
        help="our addition (not in the paper): inside a cluster, a member whose shard-time pHash and thumbnail "
        "match an earlier member's is a copy of it (similarity 1.0); needs dataeff-shards/3",
    )
    phash_max_distance: int = option(
        PHASH_MAX_DISTANCE, help="with phash: pHash copy candidate when at most this many bits of 64 differ"
    )
    min_thumb_corr: float = option(
        MIN_THUMB_CORR, help="with phash: candidate confirmed when the 16x16 thumbnails correlate at least this"
    )
    near_copies: bool = option(
        False,
        help="our addition (not in the paper): before clustering, pool-wide near-copy groups from the shard-time "
        "thumbnails keep only their sharpest member (redundant_of:<key>); needs dataeff-shards/3",
    )
    near_copy_min_corr: float = option(
        MIN_COPY_CORR,
        help="with near_copies: a pair is a copy when its zoom/shift-tolerant thumbnail correlation is at least this",
    )
    near_copy_k: int = option(COPY_K, help="with near_copies: nearest neighbours per thumbnail query (candidates)")
    max_scan_rows: int = option(
        4096,
        help="redundancy: a cluster with more valid members is split (cuts near the median along its principal "
        "direction) into leaves of at most this many, compared only within a leaf (cost N*bound, not sum of size^2); "
        "0 = exact",
    )

    def __post_init__(self) -> None:
        bad = [c for c in self.quality_checks if c not in QUALITY_REASONS]
        if bad:
            raise ConfigError(
                f"meddel.quality_checks: unknown check {bad[0]!r}; choose from {', '.join(QUALITY_REASONS)}"
            )
        if not 0.0 < self.outlier_quantile <= 1.0:
            raise ConfigError(f"meddel.outlier_quantile={self.outlier_quantile}: must be in (0, 1]")
        if self.order not in ORDERS:
            raise ConfigError(f"meddel.order={self.order!r}: choose one of {', '.join(ORDERS)}")
        if self.epsilon is not None and not 0.0 <= self.epsilon <= 2.0:
            raise ConfigError(f"meddel.epsilon={self.epsilon}: must be in [0, 2] or null (= bisection)")
        if not 0 <= self.phash_max_distance <= 64:
            raise ConfigError(f"meddel.phash_max_distance={self.phash_max_distance}: must be in 0..64")
        if not 0.0 < self.min_thumb_corr <= 1.0:
            # > 0: a row without a signature has a constant thumbnail (correlation 0), never a copy
            raise ConfigError(f"meddel.min_thumb_corr={self.min_thumb_corr}: must be in (0, 1]")
        if not 0.0 < self.near_copy_min_corr <= 1.0:
            raise ConfigError(
                f"meddel.near_copy_min_corr={self.near_copy_min_corr}: must be in (0, 1] (calibrated: {MIN_COPY_CORR})"
            )
        if self.near_copy_k < 1:
            raise ConfigError(f"meddel.near_copy_k={self.near_copy_k}: must be >= 1 (default {COPY_K})")
        if self.max_scan_rows != 0 and self.max_scan_rows < 2:
            raise ConfigError(
                f"meddel.max_scan_rows={self.max_scan_rows}: must be 0 (exact scan) or >= 2 (rows per leaf)"
            )


def quality_reasons(quality: pd.DataFrame, cfg: MedDELConfig) -> np.ndarray:
    """Invalid-frame reason per row ('' = fine): :func:`quality_codes` as strings.

    Shape:
        quality: N rows with columns mean, std, laplacian_var, dark_frac, bright_frac -> (N,) object.
    """
    return np.array(("", *REASON_CODES[1:]), dtype=object)[quality_codes(quality, cfg)]


def quality_codes(quality: pd.DataFrame, cfg: MedDELConfig) -> np.ndarray:
    """Invalid-frame reason per row as its code in :data:`~dataeff.constants.REASON_CODES` (0 = fine).

    The most specific reason wins.

    Shape:
        quality: N rows with columns mean, std, laplacian_var, dark_frac, bright_frac -> (N,) uint8.
    """
    out = np.zeros(len(quality), dtype=np.uint8)
    rules = {
        "dark": (quality["mean"] < cfg.dark_mean) | (quality["dark_frac"] > cfg.dark_frac),
        "overexposed": (quality["mean"] > cfg.overexposed_mean) | (quality["bright_frac"] > cfg.overexposed_frac),
        "blank": quality["std"] < cfg.blank_std,
        "blurred": quality["laplacian_var"] < cfg.blur_var,
    }
    # Assign in reverse priority so that a black frame (also blank and blurred) reads "dark".
    for name in reversed(QUALITY_REASONS):
        if name in cfg.quality_checks:
            out[np.asarray(rules[name].fillna(False), dtype=bool)] = REASON_CODES.index(name)
    return out


def embedding_outliers(
    labels: np.ndarray, sims: np.ndarray, valid: np.ndarray, k: int, quantile: float, min_cluster_size: int
) -> np.ndarray:
    """``small_cluster`` / ``outlier`` / neither (0) per row as codes, judged among the ``valid`` rows only.

    Shape:
        labels: (N,) int, sims: (N,) cosine to own centroid, valid: (N,) bool -> (N,) uint8
        codes in :data:`~dataeff.constants.REASON_CODES`.
    """
    out = np.zeros(len(labels), dtype=np.uint8)
    sizes = np.bincount(labels[valid], minlength=k)
    small = valid & (sizes < min_cluster_size)[labels]
    out[small] = REASON_CODES.index("small_cluster")
    rest = valid & ~small
    if quantile < 1.0 and rest.any():
        dist = 1.0 - sims[rest].astype(np.float64)  # of the judged rows only: no whole-pool float64 copy
        cut = np.quantile(dist, quantile)
        rest[rest] = dist > cut
        out[rest] = REASON_CODES.index("outlier")
    return out


def visit_order(sims: np.ndarray, order: str, seed: int, cluster_id: int) -> np.ndarray:
    """Positions of a cluster's members (given in ascending row order) in visiting order.

    Shape:
        sims: (s,) cosine to the centroid -> (s,) permutation.
    """
    idx = np.arange(len(sims))
    if order == "hard":
        return np.lexsort((idx, sims))  # farthest (lowest similarity) first, ties by row
    if order == "easy":
        return np.lexsort((idx, -sims))
    return np.random.default_rng([seed, cluster_id]).permutation(len(sims))


def max_earlier_similarity(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each row, the largest cosine similarity to an earlier row and that row's position.

    Computed in row blocks so a large cluster never holds its full similarity matrix.

    Shape:
        x: (s, D) float32 unit rows in visiting order -> m (s,) float32 (-inf for row 0),
        arg (s,) int64 (-1 for row 0).
    """
    s = len(x)
    m = np.full(s, -np.inf, dtype=np.float32)
    arg = np.full(s, -1, dtype=np.int64)
    block = max(1, _BLOCK_ELEMS // max(s, 1))
    for a in range(1, s, block):
        b = min(a + block, s)
        sim = x[a:b] @ x[:b].T  # (b-a, b)
        rows = np.arange(a, b)
        sim[rows[:, None] <= np.arange(b)[None, :]] = -np.inf  # only strictly earlier members count
        j = sim.argmax(axis=1)  # first maximum: ties go to the earliest member
        m[a:b] = sim[np.arange(b - a), j]
        arg[a:b] = j
    return np.minimum(m, 1.0), arg


def principal_direction(x: np.ndarray, start: np.ndarray) -> np.ndarray:
    """Top principal direction of the rows, by power iteration from ``start`` in float64.

    numpy sums, not BLAS: the same bits whatever the thread count.

    Shape:
        x: (n, D) float32, start: (D,) nonzero -> (D,) float64 unit.
    """
    xc = x.astype(np.float64)
    xc -= xc.mean(axis=0)
    v = start / np.sqrt((start * start).sum())
    for _ in range(_POWER_ITERATIONS):
        w = ((xc * v).sum(axis=1)[:, None] * xc).sum(axis=0)
        norm = np.sqrt((w * w).sum())
        if norm == 0.0:  # all rows equal: any direction projects them alike
            break
        v = w / norm
    return v


def _projection(x: np.ndarray, rows: np.ndarray, v: np.ndarray) -> np.ndarray:
    """``x[rows]`` dotted with ``v`` in float64, by numpy sums over row blocks (16 MB of products at a time).

    Unlike BLAS, whose kernels treat a trailing row and a split among threads differently,
    equal rows get equal bits, so rank ties fall to visit position as intended.

    Shape:
        x: (s, D) float32, rows: (n,), v: (D,) float64 -> (n,) float64.
    """
    step = max(1, (_BLOCK_ELEMS // 8) // x.shape[1])
    return np.concatenate([(x[rows[a : a + step]] * v).sum(axis=1) for a in range(0, len(rows), step)])


def scan_leaves(x: np.ndarray, max_rows: int, seed: int, cluster_id: int) -> list[np.ndarray]:
    """A cluster's visit positions in leaves of at most ``max_rows``, for the redundancy scan.

    A part with more rows is ranked by its projection on its top principal direction
    (:func:`principal_direction` of an evenly strided sample; ties by visit position) and
    cut in two near the median by :func:`_cut_near_median`, recursively. Near-duplicates
    project close together, so they nearly always share a leaf; a pair cut apart is
    missed. The start vector depends only on (seed, cluster_id), so the leaves depend
    only on the rows. ``max_rows`` = 0, or a cluster that fits: one leaf, the exact scan.

    Shape:
        x: (s, D) float32 rows in visiting order -> leaves, each (<= max_rows,) int64 ascending.
    """
    s = len(x)
    if max_rows == 0 or s <= max_rows:
        return [np.arange(s)]
    start = np.random.default_rng((seed, cluster_id, _SPLIT_STREAM)).standard_normal(x.shape[1:])
    leaves, parts = [], [np.arange(s)]
    while parts:
        part = parts.pop()
        if len(part) <= max_rows:
            leaves.append(part)
            continue
        # The direction from an evenly strided sample (by visit position); every row projected
        # in float64, so that two rows swap ranks only when their projections truly differ.
        v = principal_direction(x[part[:: -(-len(part) // _DIRECTION_ROWS)]], start)
        proj = _projection(x, part, v)
        rank = np.lexsort((part, proj))
        cut = _cut_near_median(proj[rank])
        parts += [np.sort(part[rank[:cut]]), np.sort(part[rank[cut:]])]
    return leaves


def _cut_near_median(p: np.ndarray) -> int:
    """Rank at which to cut sorted projections: the widest gap within the middle tenth of ranks.

    A cut exactly at the median would separate whichever two rows sit there, a
    near-duplicate pair with probability ~1/n per split; the widest nearby gap almost
    never lies inside one. Ties go to the rank nearest the median.

    Shape:
        p: (n,) ascending, n >= 2 -> cut in 1..n-1 (the lower part is ranks [0, cut)).
    """
    n = len(p)
    half = n // 2
    cuts = np.arange(max(1, half - n // 20), min(n - 1, half + n // 20) + 1)
    gaps = p[cuts] - p[cuts - 1]
    return int(cuts[np.lexsort((np.abs(cuts - half), -gaps))[0]])


def earliest_copy(phash: np.ndarray, thumbs: np.ndarray, max_distance: int, min_corr: float) -> np.ndarray:
    """For each row, the first earlier row it copies by perceptual signature, or -1.

    Row j copies row i < j when their pHashes are at most ``max_distance`` bits apart and
    their thumbnails correlate at least ``min_corr`` (the confirmation the hash needs on
    endoscopy, docs/overlap.md). Computed in row blocks like :func:`max_earlier_similarity`,
    and like it run per scan leaf (:func:`scan_leaves`) of a cluster larger than
    ``max_scan_rows``: the pair test is quadratic too, so a copy in another leaf is missed.

    Shape:
        phash: (s,) uint64, thumbs: (s, S, S) uint8, rows in visiting order -> (s,) int64.
    """
    s = len(phash)
    out = np.full(s, -1, dtype=np.int64)
    t = thumbs.reshape(s, -1).astype(np.float32)
    t -= t.mean(axis=1, keepdims=True)
    norm = np.linalg.norm(t, axis=1, keepdims=True)
    t = np.where(norm > 0, t / np.maximum(norm, 1e-12), 0.0)  # constant thumbnail: correlates 0
    h = np.asarray(phash, dtype=np.uint64)
    block = max(1, (_BLOCK_ELEMS // 2) // max(s, 1))  # the XOR block is uint64: half the elements
    for a in range(1, s, block):
        b = min(a + block, s)
        near = popcount64(h[a:b, None] ^ h[None, :b]) <= max_distance  # (b-a, b)
        near &= np.arange(a, b)[:, None] > np.arange(b)[None, :]  # strictly earlier members only
        i, j = np.nonzero(near)  # row-major: for each row, candidates by ascending position
        ok = np.einsum("kd,kd->k", t[a + i], t[j]) >= min_corr
        i, j = i[ok], j[ok]
        first = np.unique(i, return_index=True)[1]  # the earliest confirmed member of each row
        out[a + i[first]] = j[first]
    return out


def cluster_redundancy(
    x: np.ndarray,
    sims: np.ndarray,
    order: str,
    seed: int,
    cluster_id: int,
    signatures: tuple[np.ndarray, np.ndarray] | None = None,
    max_distance: int = PHASH_MAX_DISTANCE,
    min_corr: float = MIN_THUMB_CORR,
    max_scan_rows: int = 0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One cluster's redundancy statistics, aligned to its members in row order.

    With ``signatures`` (pHashes and thumbnails of the members), a member that copies an
    earlier one by :func:`earliest_copy` gets similarity 1.0 to it, whatever the
    embeddings say (a weak encoder can put a brightness-shifted copy far from its original).

    With ``max_scan_rows`` > 0, a larger cluster is cut into leaves by :func:`scan_leaves`
    and both comparisons (embeddings and signatures, each quadratic) run within each leaf,
    its members in visiting order: a member's ``m`` is then its largest similarity to an
    earlier member of its leaf, a lower bound of the exact one. ``pos`` stays the visit
    position in the whole cluster.

    Shape:
        x: (s, D) float32 unit rows, sims: (s,), signatures: ((s,) uint64, (s, S, S) uint8)
        -> m (s,) largest similarity to an earlier member, prev (s,) position (row order)
        of that member or -1, pos (s,) visit position.
    """
    perm = visit_order(sims, order, seed, cluster_id)
    x_v = np.ascontiguousarray(x[perm], dtype=np.float32)
    leaves = scan_leaves(x_v, max_scan_rows, seed, cluster_id)
    m_v = np.empty(len(perm), dtype=np.float32)
    arg_v = np.empty(len(perm), dtype=np.int64)
    for leaf in leaves:
        m_l, arg_l = max_earlier_similarity(x_v if len(leaves) == 1 else x_v[leaf])
        if signatures is not None:
            copy_l = earliest_copy(signatures[0][perm[leaf]], signatures[1][perm[leaf]], max_distance, min_corr)
            found = copy_l >= 0
            m_l[found], arg_l[found] = 1.0, copy_l[found]
        m_v[leaf] = m_l
        arg_v[leaf] = np.where(arg_l >= 0, leaf[np.maximum(arg_l, 0)], -1)
    m = np.empty(len(perm), dtype=np.float32)
    prev = np.empty(len(perm), dtype=np.int64)
    pos = np.empty(len(perm), dtype=np.int64)
    m[perm] = m_v
    prev[perm] = np.where(arg_v >= 0, perm[np.maximum(arg_v, 0)], -1)
    pos[perm] = np.arange(len(perm))
    return m, prev, pos


def bisect_threshold(m: np.ndarray, target: int) -> float:
    """Smallest similarity cut t with #{m <= t} >= target (+inf when fewer than target rows).

    eps = 1 - t. kept(t) = #{m <= t} only changes at the values of ``m``, so the
    bisection runs over the sorted values and ends on the exact cut (no tolerance).
    """
    if len(m) < target:
        return np.inf
    ms = np.sort(m)
    lo, hi = 0, len(ms) - 1  # the answer is ms[i] for the smallest i with kept(ms[i]) >= target
    while lo < hi:
        mid = (lo + hi) // 2
        if np.searchsorted(ms, ms[mid], side="right") >= target:
            hi = mid
        else:
            lo = mid + 1
    return float(ms[lo])


def balanced_pick(labels: np.ndarray, priority: np.ndarray, candidate: np.ndarray, total: int) -> np.ndarray:
    """Choose ``total`` candidate rows spread over clusters as evenly as their sizes allow.

    Water-filling: every cluster gets min(available, level); the remainder goes one each
    to the largest clusters still holding candidates (ties by cluster id). Inside a
    cluster, rows with the lowest ``priority`` go first (ties by row index).

    Shape:
        labels: (N,) int >= 0, priority: (N,) real, candidate: (N,) bool -> (N,) bool.
    """
    rows = np.flatnonzero(candidate)
    if total >= len(rows):
        return candidate.copy()
    out = np.zeros(len(labels), dtype=bool)
    if total <= 0:
        return out
    lab = labels[rows]
    uniq, avail = np.unique(lab, return_counts=True)
    lo, hi = 0, int(avail.max())
    while lo < hi:  # largest level with sum(min(avail, level)) <= total
        mid = (lo + hi + 1) // 2
        if np.minimum(avail, mid).sum() <= total:
            lo = mid
        else:
            hi = mid - 1
    quota = np.minimum(avail, lo)
    rest = total - int(quota.sum())
    open_ = np.flatnonzero(avail > quota)
    extra = open_[np.lexsort((uniq[open_], -avail[open_]))][:rest]
    quota[extra] += 1
    order = np.lexsort((rows, priority[rows], lab))
    sorted_lab = lab[order]
    start = np.searchsorted(sorted_lab, sorted_lab, side="left")
    within = np.arange(len(order)) - start
    q = quota[np.searchsorted(uniq, sorted_lab)]
    out[rows[order[within < q]]] = True
    return out


def decide(
    labels: np.ndarray,
    m: np.ndarray,
    pos: np.ndarray,
    valid: np.ndarray,
    target: int,
    epsilon: float | None,
) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Kept mask and redundancy mask for the whole pool, with exactly ``target`` kept if possible.

    The cut ``t`` (bisected, or ``1 - epsilon``) splits the valid rows into those below it
    (``m < t``: always kept), those tied at it (``m == t``) and those above it (redundant).
    Only the tied rows are trimmed when too many survive, cluster-balanced among the tied
    rows alone (latest visited dropped first), and a trimmed tied row is redundant like the
    rows above the cut: it has an earlier member exactly as similar as the cut allows.
    Re-choosing among *all* survivors instead would drop unique rows (m far below t) while
    keeping near-copies tied at t; with many exact copies (all clipped to m = 1.0) the cut
    reaches 1.0 and redundancy would be ignored altogether.

    A fixed ``epsilon`` that leaves more than ``target`` rows below or at its cut is lowered
    to the bisected cut, so the surplus goes most-redundant first, as with bisection (info
    ``epsilon`` is then the effective one); one that leaves too few is topped up from the
    least redundant rows above the cut.

    Shape:
        labels, m, pos: (N,) gathered from :func:`cluster_redundancy`; valid: (N,) bool (not
        dropped as invalid) -> kept (N,) bool, redundant (N,) bool, info dict (epsilon, shortfall).
    """
    n_valid = int(valid.sum())
    t = bisect_threshold(m[valid], target)
    if epsilon is not None:
        t = min(t, 1.0 - epsilon)
    below = valid & (m < t)
    tied = valid & (m == t)
    info: dict[str, Any] = {"epsilon": float(np.clip(1.0 - t, 0.0, 2.0)) if t != np.inf else None, "valid": n_valid}
    n_below, n_tied = int(below.sum()), int(tied.sum())
    if n_below + n_tied >= target:
        # By construction n_below < target: bisection gives #{m < t} < target, and a
        # lower fixed cut leaves even fewer below it.
        kept = below | balanced_pick(labels, pos, tied, target - n_below)
        # A first-visited member (m = -inf) has no earlier member to be redundant of: only
        # possible when the target is below the number of clusters; it is then not selected.
        redundant = valid & ~kept & np.isfinite(m)
    else:
        # Fixed eps left too few: fill back the least redundant, cluster-balanced.
        above = valid & (m > t)
        kept = below | tied | balanced_pick(labels, m, above, target - n_below - n_tied)
        redundant = valid & ~kept
    if n_valid < target:
        info["shortfall"] = (
            f"only {n_valid} valid samples remain after removing invalid frames and embedding outliers; "
            f"target round(R*N) = {target}, so all {n_valid} are kept"
        )
    return kept, redundant, info
