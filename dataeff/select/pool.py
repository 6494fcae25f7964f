"""The pool a selection runs on: shard indexes and embeddings, gathered and aligned by key.

Every rank loads a share of the embedding files; the rows are all-gathered and sorted
by key, so every later step sees the same pool whatever the world size. The shard
index supplies each sample's status, location and quality statistics.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd

from dataeff import dist
from dataeff.config import ConfigError
from dataeff.constants import QUALITY_KEYS
from dataeff.data import remote
from dataeff.data.stream import read_index
from dataeff.select.embed import load_embeddings, read_header

log = logging.getLogger("dataeff")


def shard_dirs(spec: str) -> list[Path | str]:
    """Shard directories of a shard spec (a directory, several joined by ',', or a brace pattern).

    Local directories come as paths, URLs (``s3://``, ``gs://``, ``http(s)://``) as strings.
    """
    items = [spec] if "{" in spec else [s.strip() for s in spec.split(",") if s.strip()]
    out: list[Path | str] = []
    for i in items:
        if remote.is_url(i):
            out.append(remote.parent(i) if "{" in i or i.endswith(".tar") else i.rstrip("/"))
        else:
            out.append(Path(i) if Path(i).is_dir() else Path(i).parent)
    return out


def read_pool_index(spec: str) -> pd.DataFrame:
    """index.parquet rows of every shard directory of ``spec`` (all statuses), with a ``shard_dir`` column."""
    frames = []
    for d in shard_dirs(spec):
        try:
            frames.append(read_index(d).assign(shard_dir=str(d)))
        except ValueError as exc:
            raise ConfigError(f"shard directory {d}: {exc}; set data.shards=<shard dir> for select") from None
    return pd.concat(frames, ignore_index=True)


def gather_pool(emb_dir: str, rank: int, world: int) -> tuple[np.ndarray, np.ndarray]:
    """All rows of the embeddings directory on every rank, sorted by key (float16).

    Rank r reads rank files r, r+W, ...; the gather order does not matter after the sort.

    Shape:
        -> keys (N,) str, embeddings (N, D) float16.
    """
    header = read_header(emb_dir)
    keys, emb = load_embeddings(emb_dir, header["files"][rank::world], dtype=np.float16)
    keys = dist.all_gather_concat(keys)
    emb = dist.all_gather_concat(emb)
    order = np.argsort(keys, kind="stable")
    keys, emb = keys[order], emb[order]
    if len(keys) and (keys[1:] == keys[:-1]).any():
        dup = keys[1:][keys[1:] == keys[:-1]][0]
        raise ConfigError(f"embeddings={emb_dir}: key {dup} appears twice; re-embed into a fresh directory")
    return keys, emb


def align_quality(keys: np.ndarray, index: pd.DataFrame, emb_dir: str) -> pd.DataFrame:
    """The ok rows of the index aligned to ``keys``; quality columns are NaN when the index has none.

    Every index column comes along, so a method also sees the shard-time image signatures
    (``pixel_sha256``, ``phash``, ``thumb``; ``dataeff-shards/3``) that ``meddel.phash`` uses;
    a method that needs them checks for them (an older index has none).

    Raises:
        ConfigError: the embedded keys and the index's ok keys differ.

    Shape:
        keys (N,) sorted -> N rows (index columns, ``shard_dir`` and :data:`QUALITY_KEYS`).
    """
    ok = index[index["status"] == "ok"].drop_duplicates("key").set_index("key")
    missing = np.setdiff1d(ok.index.to_numpy(dtype=str), keys)
    extra = np.setdiff1d(keys, ok.index.to_numpy(dtype=str))
    if len(missing) or len(extra):
        raise ConfigError(
            f"embeddings={emb_dir} do not match the shard index: {len(missing)} ok sample(s) without an embedding, "
            f"{len(extra)} embedding(s) not ok in the index; re-run 'dataeff embed' on the same shards"
        )
    frame = ok.loc[keys].reset_index()
    if not set(QUALITY_KEYS) <= set(frame.columns):
        log.warning("index has no quality statistics; quality checks are skipped")
        for c in QUALITY_KEYS:
            frame[c] = np.nan
    return frame
