"""Pure core of the leakage guard: pool x downstream pair searches and match tables.

Three signals say that a downstream image is (nearly) a pool image:

- ``exact``: the sha256 of the *decoded* RGB pixels (plus the image size) agree, so a
  PNG and its lossless re-save match, and so do two JPEG files holding the same pixels;
  the byte sha256 of the files (the shard index's ``sha256`` column) is a cheaper first
  signal that implies the same;
- ``phash``: the Hamming distance of 64-bit DCT perceptual hashes is at most a threshold
  *and* the z-normalised 16 x 16 grayscale thumbnails correlate above a threshold
  (catches resizes, re-encodes, brightness changes). The hash alone is not enough on
  endoscopy: frames share the black octagonal border and vignetting, and two different
  Kvasir-SEG images can be 2 bits apart (docs/overlap.md); the hash is the cheap filter
  over all pairs, the thumbnail check the confirmation over its candidates;
- ``embedding``: the cosine similarity of encoder embeddings is at least a threshold
  (catches what the hash misses: crops, small shifts, neighbouring video frames).

The signatures themselves (pixel hash, pHash, thumbnail) are in
:mod:`dataeff.data.signatures`: the shard stage stores them for every pool sample.
Everything here works on arrays (hash lists, packed hashes, embedding matrices) and
returns index pairs or tables; file reading lives in :mod:`dataeff.overlap`. Pair
searches go block by block over the pool, so a pool of millions never builds the full
pool x downstream matrix.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from dataeff.data.signatures import MIN_THUMB_CORR, PHASH_MAX_DISTANCE, hamming, popcount64, thumb_corr

#: Match kinds, strongest first: a pair's ``kind`` is the first of these that fired.
KINDS = ("exact", "phash", "embedding")
#: Default embedding threshold (cosine of L2-normalised embeddings): our unmeasured choice for a
#: trained ViT; check it against summary.json's ``null_nearest_cosine`` (docs/overlap.md).
MIN_COSINE = 0.95
#: Columns of a match table, in order.
MATCH_COLUMNS = ("pool_key", "dataset", "file", "kind", "signals", "phash_distance", "thumb_corr", "cosine")


# --------------------------------------------------------------------------- pair searches


def _block_rows(n_queries: int, block_elems: int) -> int:
    return max(1, block_elems // max(n_queries, 1))


def exact_pairs(pool: Sequence[str], queries: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Index pairs whose hashes are equal (empty strings never match).

    Shape:
        pool: N hashes, queries: M hashes -> (pool_idx (K,), query_idx (K,)) int64.
    """
    by_hash: dict[str, list[int]] = {}
    for j, h in enumerate(queries):
        if h:
            by_hash.setdefault(h, []).append(j)
    pairs = [(i, j) for i, h in enumerate(pool) if h for j in by_hash.get(h, ())]
    arr = np.asarray(pairs, dtype=np.int64).reshape(-1, 2)
    return arr[:, 0], arr[:, 1]


def phash_pairs(
    pool: np.ndarray, queries: np.ndarray, max_distance: int, block_elems: int = 1 << 24
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Index pairs whose packed pHashes are at most ``max_distance`` bits apart.

    The pool is scanned in blocks of ``block_elems // M`` rows, so memory stays at
    ``block_elems`` distances whatever N.

    Shape:
        pool: (N,) uint64, queries: (M,) uint64 -> (pool_idx (K,), query_idx (K,)) int64,
        distance (K,) int64.
    """
    rows = _block_rows(len(queries), block_elems)
    out_i, out_j, out_d = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)], [np.zeros(0, np.int64)]
    for start in range(0, len(pool), rows):
        dist = hamming(pool[start : start + rows], queries)
        i, j = np.nonzero(dist <= max_distance)
        out_i.append(i + start)
        out_j.append(j)
        out_d.append(dist[i, j].astype(np.int64))
    return np.concatenate(out_i), np.concatenate(out_j), np.concatenate(out_d)


def confirmed_phash_pairs(
    pool: np.ndarray,
    queries: np.ndarray,
    pool_thumbs: np.ndarray,
    query_thumbs: np.ndarray,
    max_distance: int = PHASH_MAX_DISTANCE,
    min_corr: float = MIN_THUMB_CORR,
    block_elems: int = 1 << 24,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`phash_pairs` kept only where the thumbnails correlate at least ``min_corr``.

    Shape:
        pool: (N,) uint64, queries: (M,) uint64, pool_thumbs: (N, S, S), query_thumbs:
        (M, S, S) -> (pool_idx (K,), query_idx (K,)) int64, distance (K,) int64.
    """
    i, j, d = phash_pairs(pool, queries, max_distance, block_elems)
    keep = thumb_corr(pool_thumbs[i], query_thumbs[j]) >= min_corr
    return i[keep], j[keep], d[keep]


def cosine_pairs(
    pool: np.ndarray, queries: np.ndarray, min_cosine: float, block_elems: int = 1 << 24
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Index pairs of L2-normalised embeddings with cosine similarity >= ``min_cosine``.

    The pool is scanned in blocks of ``block_elems // M`` rows (cast to float32 one
    block at a time), so a float16 pool of millions x 768 is never copied whole.

    Shape:
        pool: (N, D), queries: (M, D) -> (pool_idx (K,), query_idx (K,)) int64, cosine (K,) float32.
    """
    if pool.shape[1:] != queries.shape[1:]:
        raise ValueError(f"cosine_pairs: pool dim {pool.shape[1:]} != query dim {queries.shape[1:]}")
    q = np.asarray(queries, dtype=np.float32)
    rows = _block_rows(len(q), block_elems)
    out_i, out_j, out_c = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)], [np.zeros(0, np.float32)]
    for start in range(0, len(pool), rows):
        sim = np.asarray(pool[start : start + rows], dtype=np.float32) @ q.T
        i, j = np.nonzero(sim >= min_cosine)
        out_i.append(i + start)
        out_j.append(j)
        out_c.append(sim[i, j])
    return np.concatenate(out_i), np.concatenate(out_j), np.concatenate(out_c)


# --------------------------------------------------------------------------- match table


def match_table(
    pool_keys: Sequence[str] | np.ndarray,
    query_dataset: Sequence[str] | np.ndarray,
    query_file: Sequence[str] | np.ndarray,
    found: dict[str, tuple[np.ndarray, np.ndarray]],
    pool_phash: np.ndarray | None = None,
    query_phash: np.ndarray | None = None,
    pool_emb: np.ndarray | None = None,
    query_emb: np.ndarray | None = None,
    pool_thumbs: np.ndarray | None = None,
    query_thumbs: np.ndarray | None = None,
) -> pd.DataFrame:
    """One row per (pool sample, downstream image) pair that any signal matched.

    ``kind`` is the strongest signal that fired (order of :data:`KINDS`), ``signals``
    all of them joined by ``+``. ``phash_distance``, ``thumb_corr`` and ``cosine`` are
    filled for every row from the given arrays, whichever signal found the pair (-1 /
    NaN without them).

    Args:
        pool_keys: the pool's sample keys.
        query_dataset, query_file: dataset name and file (relative to its root) per query.
        found: ``{kind: (pool_idx, query_idx)}`` from the pair searches.
        pool_phash, query_phash: packed pHashes (N,) and (M,) uint64.
        pool_emb, query_emb: L2-normalised embeddings (N, D) and (M, D).
        pool_thumbs, query_thumbs: thumbnails (N, S, S) and (M, S, S).

    Returns:
        a frame with :data:`MATCH_COLUMNS`, sorted by dataset, file, pool key.
    """
    unknown = sorted(set(found) - set(KINDS))
    if unknown:
        raise ValueError(f"match_table: unknown kinds {unknown}; choose from {KINDS}")
    fired: dict[tuple[int, int], list[str]] = {}
    for kind in KINDS:
        pi, qi = found.get(kind, (np.zeros(0, np.int64), np.zeros(0, np.int64)))
        for i, j in zip(pi.tolist(), qi.tolist(), strict=True):
            kinds_of = fired.setdefault((i, j), [])
            if kind not in kinds_of:  # pixel and byte hashes both say "exact"
                kinds_of.append(kind)
    pairs = np.asarray(sorted(fired), dtype=np.int64).reshape(-1, 2)
    pi, qi = pairs[:, 0], pairs[:, 1]
    if pool_phash is not None and query_phash is not None:
        dist = popcount64(np.asarray(pool_phash, np.uint64)[pi] ^ np.asarray(query_phash, np.uint64)[qi])
        distance = dist.astype(np.int64)
    else:
        distance = np.full(len(pi), -1, dtype=np.int64)
    if pool_emb is not None and query_emb is not None and len(pi):
        cos = np.einsum("kd,kd->k", np.asarray(pool_emb[pi], np.float32), np.asarray(query_emb[qi], np.float32))
    else:
        cos = np.full(len(pi), np.nan, dtype=np.float32)
    if pool_thumbs is not None and query_thumbs is not None and len(pi):
        corr = thumb_corr(np.asarray(pool_thumbs)[pi], np.asarray(query_thumbs)[qi])
    else:
        corr = np.full(len(pi), np.nan, dtype=np.float32)
    kinds = [fired[(i, j)] for i, j in zip(pi.tolist(), qi.tolist(), strict=True)]
    table = pd.DataFrame(
        {
            "pool_key": np.asarray(pool_keys, dtype=object)[pi] if len(pi) else np.zeros(0, dtype=object),
            "dataset": np.asarray(query_dataset, dtype=object)[qi] if len(qi) else np.zeros(0, dtype=object),
            "file": np.asarray(query_file, dtype=object)[qi] if len(qi) else np.zeros(0, dtype=object),
            "kind": [k[0] for k in kinds],
            "signals": ["+".join(k) for k in kinds],
            "phash_distance": distance,
            "thumb_corr": corr,
            "cosine": cos.astype(np.float32),
        },
        columns=list(MATCH_COLUMNS),
    )
    return table.sort_values(["dataset", "file", "pool_key"], kind="stable").reset_index(drop=True)


def excluded_keys(matches: pd.DataFrame, kinds: Sequence[str] = KINDS) -> set[str]:
    """Pool keys that matched a downstream image by any signal in ``kinds``."""
    bad = sorted(set(kinds) - set(KINDS))
    if bad:
        raise ValueError(f"excluded_keys: unknown kinds {bad}; choose from {KINDS}")
    if matches.empty:  # an empty parquet column reads back as float, which has no .str
        return set()
    fired = matches["signals"].astype(str).str.split("+").map(lambda s: bool(set(s) & set(kinds)))
    return set(matches.loc[fired.astype(bool), "pool_key"].astype(str))


def summarise(matches: pd.DataFrame, datasets: Sequence[str]) -> dict[str, dict[str, int]]:
    """Per dataset: matched downstream images and pool samples, overall and by kind.

    Returns:
        ``{dataset: {"pairs", "files", "pool_keys", "exact", "phash", "embedding"}}``
        where a kind counts the downstream files whose strongest match is that kind.
    """
    out: dict[str, dict[str, int]] = {}
    for name in datasets:
        sub = matches[matches["dataset"] == name]
        strongest = sub.groupby("file")["kind"].agg(lambda k: min(k, key=KINDS.index)) if len(sub) else pd.Series()
        row = {"pairs": len(sub), "files": int(sub["file"].nunique()), "pool_keys": int(sub["pool_key"].nunique())}
        row.update({kind: int((strongest == kind).sum()) for kind in KINDS})
        out[name] = row
    return out


def nearest_other_cosine(emb: np.ndarray, groups: Sequence[str], block_elems: int = 1 << 24) -> np.ndarray:
    """Per row, the largest cosine to a row of another group (e.g. another pixel hash).

    Run on one downstream dataset, this is the null distribution of the embedding
    signal: how similar *different* images of one domain already are. When its upper
    quantiles reach ``min_cosine``, the embedding signal cannot tell copies from
    neighbours (a random-init encoder scores distinct Kvasir frames up to 0.999).

    Shape:
        emb: (M, D) L2-normalised, groups: M ids -> (M,) float32 (-inf for a lone group).
    """
    x = np.asarray(emb, dtype=np.float32)
    codes = pd.factorize(pd.Series(list(groups), dtype=object))[0]
    rows = _block_rows(len(x), block_elems)
    out = np.full(len(x), -np.inf, dtype=np.float32)
    for start in range(0, len(x), rows):
        sim = x[start : start + rows] @ x.T
        sim[codes[start : start + rows, None] == codes[None, :]] = -np.inf
        out[start : start + rows] = sim.max(axis=1) if len(x) else out[start : start + rows]
    return out
