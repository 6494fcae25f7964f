"""The pool a selection runs on: shard indexes and embeddings, gathered and aligned by key.

Every rank loads a share of the embedding files; the rows are all-gathered and sorted
by key, so every later step sees the same pool whatever the world size
(``select.gather=all``). When the gathered matrix would not fit
(``select.gather=partitioned``, or ``auto`` past ``select.gather_memory_fraction`` of
the node's memory) only the keys are gathered and each rank keeps the rows it read
(``distributed_cluster.LocalRows``). The shard index supplies each sample's status,
location and quality statistics.
"""

from __future__ import annotations

import logging
import os
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd

from dataeff import dist
from dataeff.config import ConfigError
from dataeff.constants import QUALITY_KEYS
from dataeff.data import remote
from dataeff.data.stream import read_index
from dataeff.select.distributed_cluster import LocalRows
from dataeff.select.embed import damaged_file, load_embeddings, read_header, read_npz_rows

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


def read_pool_index(spec: str, columns: tuple[str, ...] | None = None) -> pd.DataFrame:
    """index.parquet rows of every shard directory of ``spec`` (all statuses), with a ``shard_dir`` column.

    ``columns``: only these (those an older index has), else every column.
    """
    frames = []
    for d in shard_dirs(spec):
        try:
            frames.append(read_index(d, columns).assign(shard_dir=str(d)))
        except ValueError as exc:
            raise ConfigError(f"shard directory {d}: {exc}; set data.shards=<shard dir> for select") from None
    # A category: one string per shard directory, not one per row.
    return pd.concat(frames, ignore_index=True).astype({"shard_dir": "category"})


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
    _check_unique(keys, emb_dir)
    return keys, emb


def partition_keys(emb_dir: str, header: dict, rank: int, world: int) -> tuple[np.ndarray, np.ndarray]:
    """Every rank: the pool's sorted keys, and where the keys of its own rank files
    (r, r+W, ...) fall in them. Their rows come after (:func:`local_rows`), so that what
    the keys and the index cost is spent before the rows arrive.

    Shape:
        header: :func:`~dataeff.select.embed.read_header`'s -> keys (N,) str sorted, positions
        (n_r,) int64 of this rank's rows in ``keys``.
    """
    mine = _file_keys(emb_dir, header["files"][rank::world])
    keys = np.concatenate(dist.all_gather_array(mine))  # a new array, sorted in place: no third copy
    keys.sort(kind="stable")
    _check_unique(keys, emb_dir)
    return keys, np.searchsorted(keys, mine).astype(np.int64)


def local_rows(emb_dir: str, header: dict, rank: int, world: int, pos: np.ndarray, n: int) -> LocalRows:
    """This rank's embedding rows, read in blocks straight into one array (no copy of a whole file).

    Raises:
        ConfigError: a rank file is damaged, or its files hold other than one row per key.

    Shape:
        pos: (n_r,) from :func:`partition_keys`, n: pool size -> rows (n_r, D) float16 at those positions.
    """
    rows = np.empty((len(pos), header["dim"]), dtype=np.float16)
    at = 0
    for name in header["files"][rank::world]:
        try:
            at += read_npz_rows(remote.join(emb_dir, name), rows[at:])
        except (OSError, ValueError, KeyError, zipfile.BadZipFile) as exc:
            raise damaged_file(emb_dir, name, exc) from None
    if at != len(pos):
        names = ", ".join(header["files"][rank::world])
        raise damaged_file(emb_dir, names, ValueError(f"{at} embedding rows for {len(pos)} keys"))
    return LocalRows(rows, pos, n)


def pool_keys(emb_dir: str, header: dict) -> np.ndarray:
    """The pool's sorted keys, read from every rank file of the embeddings (their keys only).

    Shape:
        -> (N,) str, as :func:`partition_keys` and :func:`gather_pool` return them.
    """
    keys = _file_keys(emb_dir, header["files"])
    keys.sort(kind="stable")
    return keys


def _file_keys(emb_dir: str, names: list[str]) -> np.ndarray:
    """The keys of these rank files, concatenated in file order; the embeddings are not read
    (nor fetched, for a URL: ``np.load`` reads one member of the streamed zip)."""
    keys = [np.zeros(0, dtype=str)]
    for name in names:
        try:
            with remote.open_stream(remote.join(emb_dir, name)) as fh, np.load(fh, allow_pickle=False) as z:
                keys.append(z["keys"])
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:
            raise damaged_file(emb_dir, name, exc) from None
    return np.concatenate(keys)


def choose_gather(gather: str, memory_fraction: float, blocker: str, n: int, dim: int) -> str:
    """``all`` or ``partitioned`` for ``select.gather`` (``auto`` decides here; same answer on every rank).

    ``auto`` partitions when the gathered float16 matrix of every rank on this node,
    N x D x 2 bytes x ranks per node, exceeds ``memory_fraction`` of the node's physical
    memory, unless ``blocker`` (a reason the run needs the whole matrix) is set.
    """
    if gather != "auto":
        return gather
    need = n * dim * 2 * dist.ranks_per_node()
    total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    too_big = need > memory_fraction * total
    if too_big and blocker:
        log.warning(
            "gathered embeddings (%.1f GiB on this node) exceed select.gather_memory_fraction=%g of %.1f GiB, "
            "but %s: gathering anyway",
            need / 2**30,
            memory_fraction,
            total / 2**30,
            blocker,
        )
    return "partitioned" if too_big and not blocker else "all"


def _check_unique(keys: np.ndarray, emb_dir: str) -> None:
    if len(keys) and (keys[1:] == keys[:-1]).any():
        dup = keys[1:][keys[1:] == keys[:-1]][0]
        raise ConfigError(f"embeddings={emb_dir}: key {dup} appears twice; re-embed into a fresh directory")


def align_quality(keys: np.ndarray, index: pd.DataFrame, emb_dir: str, columns: tuple[str, ...]) -> pd.DataFrame:
    """The ok rows of the index aligned to ``keys``; quality columns are NaN when the index has none.

    Of the index, ``columns`` (those it has) and ``shard_dir`` come along: the method's
    (:func:`~dataeff.select.methods.index_columns`), such as the shard-time image signatures
    (``pixel_sha256``, ``phash``, ``thumb``; ``dataeff-shards/3``) that ``meddel.phash`` uses;
    a method that needs them checks for them (an older index has none).

    Raises:
        ConfigError: the embedded keys and the index's ok keys differ.

    Shape:
        keys (N,) sorted -> N rows (``columns``, ``shard_dir`` and :data:`QUALITY_KEYS`).
    """
    wanted = [c for c in index.columns if c in {*columns, "key", "shard_dir"}]
    ok = index.loc[index["status"] == "ok", wanted].drop_duplicates("key").set_index("key")
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
