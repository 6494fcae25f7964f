"""Pool-wide near-copy groups from the shard-time 16 x 16 thumbnails (MedDEL's optional ``near_copies``).

Our addition; the MedDEL paper compares samples only inside k-means clusters. A weak
encoder scatters a frame's brightness-shifted or zoomed copy into another cluster
(docs/selection.md), so this pass looks for copies over the whole pool, from the
thumbnails the shard stage stored (``dataeff.data.signatures``), without N^2 work:

1. every thumbnail is standardised (mean 0, unit norm: brightness and contrast
   invariant) over its inner :data:`INNER` x :data:`INNER` pixels (the outermost ring
   is left out: it holds the black border every endoscopy frame shares, and the band a
   camera shift fills with black);
2. candidates: the ``k`` nearest neighbours (inner product = Pearson correlation,
   faiss ``IndexFlatIP``) of each thumbnail and of its centred zoomed-in versions
   (:data:`ZOOMS`, bilinear resample of the centre region back to 16 x 16), so that a
   zoom crop is found from its original;
3. confirmation: the registration-tolerant correlation :func:`copy_score`, the largest
   correlation over the zooms and +-:data:`SHIFT` px shifts of either thumbnail, at
   least ``min_corr``;
4. confirmed pairs -> connected groups (union-find); each group keeps its sharpest
   member (largest Laplacian variance, ties by row) and every other member points to
   the member it was reached from in a breadth-first walk from the kept one, so each
   removed sample names a sample it was confirmed to copy.

Calibration (docs/selection.md): on the 1000 vendored Kvasir-SEG images, copies made by
the demo's own transforms score >= 0.97 for 99.2% of shifts, 99.5% of zoom crops and
all brightness changes and re-encodes (minimum 0.954); of the 499,500 pairs of
different files, 4 are Kvasir-SEG's own duplicates (>= 0.997) and 4 others score
0.97-0.989 (99.99th percentile 0.941).

Pure numpy + faiss over arrays; no I/O, no collectives.
"""

from __future__ import annotations

from collections import deque

import numpy as np

from dataeff.select.cluster import import_faiss

#: Centred zooms tried (besides 1.0): the demo's crops zoom 1.09-1.18x.
ZOOMS = (1.1, 1.15, 1.2)
#: Sub-pixel shift (thumbnail px; 1 px = 20 px of a 320-px frame) tried in x and y.
SHIFT = 0.5
#: Side of the centred region the correlation is taken over (16 - 2: drop the outer ring).
INNER = 14
#: Default confirmation threshold (calibrated on Kvasir-SEG, module docstring).
MIN_COPY_CORR = 0.97
#: Default neighbours per query.
COPY_K = 16
#: Rows warped per block when confirming candidate pairs (:func:`pair_scores`).
_ROW_BLOCK = 512


def resample_matrix(n: int, zoom: float, shift: float) -> np.ndarray:
    """Bilinear 1-D resampling matrix: zoom about the centre by ``zoom``, then shift by ``shift`` px.

    Output pixel i (centre i + 0.5) samples the input at ``n/2 + (i + 0.5 - n/2) / zoom - 0.5 + shift``,
    clamped to the edge.

    Shape:
        -> (n, n) float64; ``m @ row`` is the resampled row.
    """
    c = n / 2
    x = np.clip(c + (np.arange(n) + 0.5 - c) / zoom - 0.5 + shift, 0, n - 1)
    i0 = np.floor(x).astype(np.int64)
    i1 = np.minimum(i0 + 1, n - 1)
    w = x - i0
    m = np.zeros((n, n))
    np.add.at(m, (np.arange(n), i0), 1 - w)
    np.add.at(m, (np.arange(n), i1), w)
    return m


def warps(zooms: tuple[float, ...], shift: float) -> list[tuple[float, float, float]]:
    """(zoom, dy, dx) of every registration tried: zoom in (1.0, *zooms), shifts in {-shift, 0, shift}^2."""
    s = (-shift, 0.0, shift) if shift else (0.0,)
    return [(z, dy, dx) for z in (1.0, *zooms) for dy in s for dx in s]


def warp(thumbs: np.ndarray, regs: list[tuple[float, float, float]]) -> np.ndarray:
    """Every thumbnail resampled by every registration.

    Shape:
        thumbs: (N, S, S) -> (N, len(regs), S, S) float32.
    """
    t = np.asarray(thumbs, dtype=np.float32)
    n = t.shape[-1]
    out = np.empty((len(t), len(regs), n, n), dtype=np.float32)
    for r, (z, dy, dx) in enumerate(regs):
        ry, rx = resample_matrix(n, z, dy).astype(np.float32), resample_matrix(n, z, dx).astype(np.float32)
        out[:, r] = ry @ t @ rx.T
    return out


def standardise(x: np.ndarray, inner: int = INNER) -> np.ndarray:
    """Centred inner region of each image, mean removed, unit norm (a constant region -> zeros).

    The inner product of two standardised images is the Pearson correlation of their regions.

    Shape:
        x: (..., S, S) -> (..., inner * inner) float32.
    """
    m = (x.shape[-1] - inner) // 2
    v = np.asarray(x, dtype=np.float32)[..., m : m + inner, m : m + inner]
    v = v.reshape(*v.shape[:-2], inner * inner)
    v = v - v.mean(axis=-1, keepdims=True)
    norm = np.linalg.norm(v, axis=-1, keepdims=True)
    return np.where(norm > 0, v / np.maximum(norm, 1e-12), 0.0).astype(np.float32)


def copy_score(a: np.ndarray, b: np.ndarray, zooms: tuple[float, ...] = ZOOMS, shift: float = SHIFT) -> np.ndarray:
    """Registration-tolerant correlation of paired thumbnails (symmetric).

    The largest Pearson correlation (inner region) of one thumbnail, zoomed and shifted by
    any of :func:`warps`, with the other as it is, either way round.

    Shape:
        a, b: (K, S, S) -> (K,) float32.
    """
    k = len(a)
    pairs = np.stack([np.arange(k), np.arange(k, 2 * k)], axis=1)
    return pair_scores(np.concatenate([a, b]), pairs, zooms, shift)


def pair_scores(
    thumbs: np.ndarray, pairs: np.ndarray, zooms: tuple[float, ...] = ZOOMS, shift: float = SHIFT
) -> np.ndarray:
    """:func:`copy_score` of pairs of rows, each row warped once however many pairs it is in.

    Pairs are grouped by their first (then second) row; a block of rows is warped
    (len(warps) images each) and multiplied with its partners, padded to the block's
    largest partner count, so memory stays ~ block x (warps + partners) x INNER^2.

    Shape:
        thumbs: (N, S, S), pairs: (P, 2) int64 rows -> (P,) float32.
    """
    regs = warps(zooms, shift)
    flat = standardise(thumbs)
    out = np.full(len(pairs), -1.0, dtype=np.float32)
    for src_col in (0, 1):
        src, dst = pairs[:, src_col], pairs[:, 1 - src_col]
        order = np.argsort(src, kind="stable")
        rows, first, counts = np.unique(src[order], return_index=True, return_counts=True)
        for b in range(0, len(rows), _ROW_BLOCK):
            r, f, c = rows[b : b + _ROW_BLOCK], first[b : b + _ROW_BLOCK], counts[b : b + _ROW_BLOCK]
            w = standardise(warp(thumbs[r], regs))  # (B, R, D)
            slot = np.arange(int(c.max()))
            ok = slot[None, :] < c[:, None]  # (B, C) real partners
            idx = order[np.where(ok, f[:, None] + slot[None, :], f[:, None])]  # pair ids, padded with the first
            part = flat[dst[idx]]  # (B, C, D)
            best = np.matmul(w, part.transpose(0, 2, 1)).max(axis=1)  # (B, C)
            out[idx[ok]] = np.maximum(out[idx[ok]], best[ok])
    return out


def candidate_pairs(thumbs: np.ndarray, rows: np.ndarray, zooms: tuple[float, ...], k: int) -> np.ndarray:
    """Pairs of ``rows`` where one is among the ``k`` nearest of the other or of its zoomed versions.

    Exact search (``IndexFlatIP``): N x (1 + len(zooms)) queries against N vectors of
    INNER^2 floats. For millions of rows the same queries go to an ``IndexIVFFlat``
    (nlist ~ 4 sqrt(N), a few dozen probes) or a GPU index; the confirmation is unchanged.

    Shape:
        thumbs: (N, S, S), rows: (n,) int64 ascending -> (P, 2) int64 pool rows, i < j, sorted, unique.
    """
    if len(rows) < 2:
        return np.zeros((0, 2), dtype=np.int64)
    base = np.ascontiguousarray(standardise(thumbs[rows]))
    index = import_faiss("the near-copy pass (meddel.near_copies)").IndexFlatIP(base.shape[1])
    index.add(base)
    kk = min(k + 1, len(rows))  # + 1: a row finds itself
    parts = []
    for z in (1.0, *zooms):
        q = np.ascontiguousarray(standardise(warp(thumbs[rows], [(z, 0.0, 0.0)])[:, 0]))
        _, nn = index.search(q, kk)
        src = np.repeat(np.arange(len(rows)), kk)
        dst = nn.reshape(-1)
        ok = (dst >= 0) & (dst != src)
        parts.append(np.stack([src[ok], dst[ok]], axis=1))
    p = np.concatenate(parts)
    p = np.unique(np.sort(p, axis=1), axis=0)
    return rows[p]


def copy_groups(n: int, pairs: np.ndarray, sharpness: np.ndarray) -> np.ndarray:
    """Connected groups of confirmed pairs; the kept member of each and who every other one copies.

    Each group keeps its sharpest member (largest ``sharpness``, NaN lowest, ties by the
    lowest row); the others get the row they were reached from in a breadth-first walk
    from the kept member over confirmed pairs (neighbours in ascending row order), so
    the result depends only on the pairs, not on their order.

    Shape:
        pairs: (P, 2) int64 rows, sharpness: (n,) float -> parent (n,) int64, -1 = kept or in no group.
    """
    parent = np.full(n, -1, dtype=np.int64)
    if len(pairs) == 0:
        return parent
    adj: dict[int, list[int]] = {}
    for i, j in np.unique(np.sort(np.asarray(pairs, dtype=np.int64), axis=1), axis=0).tolist():
        if i != j:
            adj.setdefault(i, []).append(j)
            adj.setdefault(j, []).append(i)
    sharp = np.nan_to_num(np.asarray(sharpness, dtype=np.float64), nan=-np.inf)
    seen: set[int] = set()
    for start in sorted(adj):
        if start in seen:
            continue
        group, todo = [start], deque([start])  # collect the group first, to choose whom to keep
        seen.add(start)
        while todo:
            for j in sorted(adj[todo.popleft()]):
                if j not in seen:
                    seen.add(j)
                    group.append(j)
                    todo.append(j)
        keep = min(group, key=lambda r: (-sharp[r], r))
        reached, todo = {keep}, deque([keep])
        while todo:
            i = todo.popleft()
            for j in sorted(adj[i]):
                if j not in reached:
                    reached.add(j)
                    parent[j] = i
                    todo.append(j)
    return parent


def near_copy_parents(
    thumbs: np.ndarray,
    valid: np.ndarray,
    sharpness: np.ndarray,
    min_corr: float = MIN_COPY_CORR,
    k: int = COPY_K,
    zooms: tuple[float, ...] = ZOOMS,
) -> tuple[np.ndarray, dict[str, int]]:
    """The whole pass: candidates, confirmation, groups. Rows not ``valid`` take no part.

    Args:
        thumbs: shard-time thumbnails; a row without one is constant and never matches.
        valid: rows that may be grouped (e.g. not an invalid frame, has a signature).
        sharpness: Laplacian variance per row (which member of a group stays).

    Returns:
        parent (N,) int64: the row each removed near-copy copies, -1 for the rest; and
        counts (candidate pairs, confirmed pairs, groups, removed rows).

    Shape:
        thumbs: (N, S, S) uint8, valid: (N,) bool, sharpness: (N,) -> parent (N,).
    """
    t = np.asarray(thumbs, dtype=np.float32)
    rows = np.flatnonzero(np.asarray(valid, bool) & (t.reshape(len(t), -1).std(axis=1) > 0))
    cand = candidate_pairs(t, rows, zooms, k)
    score = pair_scores(t, cand, zooms)
    pairs = cand[score >= min_corr]
    parent = copy_groups(len(t), pairs, sharpness)
    removed = parent >= 0
    info = {
        "candidate_pairs": len(cand),
        "confirmed_pairs": len(pairs),
        "groups": len(set(pairs.reshape(-1).tolist())) - int(removed.sum()),
        "removed": int(removed.sum()),
    }
    return parent, info
