"""``dataeff index``: the ``index.parquet`` of WebDataset shards that another tool wrote.

Shards written by ``webdataset.ShardWriter``, img2dataset or any tar writer that groups a
sample's members under one key (``<key>.<ext>``) become a shard set every stage reads:
each tar is scanned once, in one sequential pass, and every sample gets an index row in
the format ``dataeff shard`` writes (:func:`dataeff.data.shard.write_index`): its key,
its image member (``source``), where the image bytes sit in the tar (``offset``,
``length``), and the checks, quality statistics and signatures of
:func:`dataeff.data.quality.inspect_bytes`, so MedDEL's invalid-frame rules and the
leakage guard work as on shards dataeff wrote. The tars are not changed.

A sample's image is its first ``jpg``, ``jpeg``, ``png`` or ``webp`` member (in that
order); every other member (class labels, captions, ``.pyd``/``.pickle``) is skipped
without being decoded, so indexing an untrusted tar cannot trigger pickle. A sample
without an image member, a damaged or too small image, and a key seen before are
rejected with a reason; a byte-identical copy of an earlier image is a ``duplicate``,
as in ``dataeff shard``. Every sample of every tar has exactly one row.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing as mp
import tarfile
import tempfile
import time
from collections.abc import Generator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from braceexpand import braceexpand
from tqdm import tqdm
from webdataset.tariterators import base_plus_ext

from dataeff.config import ConfigError, option, to_dict
from dataeff.constants import DUPLICATE_KEY, DUPLICATE_PREFIX, INDEX_NAME, NO_IMAGE_MEMBER, SHARDS_FORMAT, SUMMARY_NAME
from dataeff.data import remote
from dataeff.data.quality import InspectOptions, inspect_bytes, pil_limits
from dataeff.data.shard import write_index
from dataeff.data.stream import IMAGE_EXTS
from dataeff.files import write_json_atomic

log = logging.getLogger("dataeff")


@dataclass
class IndexConfig:
    """Write ``index.parquet`` (+ ``summary.json``) beside existing WebDataset tars (``dataeff index``)."""

    shards: str = option(
        "",
        help="the tars: a folder of .tar files, several joined by ',', or a brace pattern; local, s3:// or gs:// "
        "(the index is written beside them)",
    )
    workers: int = option(2, help="processes scanning tars in parallel (1 = in the main process)")
    min_side: int = option(32, help="reject images whose short side is below this, px (too_small)")
    max_pixels: int = option(89_478_485, help="reject images with more pixels (decompression_bomb); 0 = no limit")
    keep_duplicates: bool = option(
        False, help="keep byte-identical copies of an earlier image (status ok, reason exact_duplicate_of:<key>)"
    )
    overwrite: bool = option(False, help="replace an existing index.parquet (e.g. one written by 'dataeff shard')")
    progress: bool = option(True, help="show a progress bar")

    def __post_init__(self) -> None:
        if not self.shards:
            raise ConfigError("shards is required: the folder of WebDataset tars, e.g. dataeff index shards/mydata")
        if self.workers < 1:
            raise ConfigError(f"workers={self.workers}: must be at least 1")
        for key in ("min_side", "max_pixels"):
            if getattr(self, key) < 0:
                raise ConfigError(f"{key}={getattr(self, key)}: must be >= 0")

    def inspect_options(self) -> InspectOptions:
        return InspectOptions(
            min_side=self.min_side, max_pixels=self.max_pixels, extensions=tuple(f".{e}" for e in IMAGE_EXTS)
        )


# --------------------------------------------------------------------------- one tar


def _samples(fh: Any, where: str) -> Iterator[tuple[str, list[tuple[tarfile.TarInfo, bytes | None]]]]:
    """``(key, [(member, image bytes or None)])`` per sample, in tar order; only image members are read."""
    current: str | None = None
    members: list[tuple[tarfile.TarInfo, bytes | None]] = []
    try:
        with tarfile.open(fileobj=fh, mode="r|") as tar:
            for info in tar:
                if not info.isfile():
                    continue
                key, ext = base_plus_ext(info.name)
                if key is None or ext is None:
                    continue
                if key != current:
                    if current is not None:
                        yield current, members
                    current, members = key, []
                data = None
                if ext.lower() in IMAGE_EXTS:
                    extracted = tar.extractfile(info)
                    assert extracted is not None  # a regular file
                    data = extracted.read()
                members.append((info, data))
    except tarfile.TarError as exc:
        raise ConfigError(f"{where}: not a readable uncompressed tar ({exc}); index plain .tar shards") from None
    if current is not None:
        yield current, members


def _image_member(members: list[tuple[tarfile.TarInfo, bytes | None]]) -> tuple[tarfile.TarInfo, bytes] | None:
    images = {base_plus_ext(info.name)[1].lower(): (info, data) for info, data in members if data is not None}
    return next((images[e] for e in IMAGE_EXTS if e in images), None)


def index_tar(location: str, opts: InspectOptions) -> list[dict[str, Any]]:
    """One index row per sample of the tar at ``location`` (path or URL), in tar order.

    Must run inside :func:`~dataeff.data.quality.pil_limits`.
    """
    name = remote.basename(location)
    rows = []
    with remote.open_stream(location) as fh:
        for key, members in _samples(fh, location):
            found = _image_member(members)
            if found is None:
                row = inspect_bytes(b"", members[0][0].name, opts).row
                row.update(reason=NO_IMAGE_MEMBER, sha256="")
                info, length = members[0][0], 0
            else:
                info, data = found
                row = inspect_bytes(data, info.name, opts).row
                length = len(data)
            ok = row["status"] == "ok"
            row.update(
                key=key,
                source=info.name,
                shard=name,
                offset=info.offset_data if ok else 0,
                length=length if ok else 0,
            )
            rows.append(row)
    return rows


def mark_repeats(rows: list[dict[str, Any]], keep_duplicates: bool) -> None:
    """Reject a key seen before (``duplicate_key``) and mark byte-identical copies, as ``shard`` does."""
    first_of: dict[str, str] = {}
    seen: set[str] = set()
    for row in rows:
        if row["key"] in seen:
            row.update(status="rejected", reason=DUPLICATE_KEY, offset=0, length=0)
            continue
        seen.add(row["key"])
        if row["status"] != "ok":
            continue
        first = first_of.setdefault(row["sha256"], row["key"])
        if first != row["key"]:
            row["reason"] = f"{DUPLICATE_PREFIX}{first}"
            if not keep_duplicates:
                row.update(status="duplicate", offset=0, length=0)


# --------------------------------------------------------------------------- stage


def _tar_folders(spec: str) -> dict[str, list[str]]:
    """The tars of ``spec`` grouped by the folder whose index will list them."""
    items = [spec.strip()] if "{" in spec else [s.strip() for s in spec.split(",") if s.strip()]
    tars: list[str] = []
    for item in items:
        if "{" in item or item.endswith(".tar"):
            tars += list(braceexpand(item))
            continue
        names = remote.list_names(item)
        if names is None:
            raise ConfigError(f"shards={item}: cannot list an http(s) folder; give a brace pattern of its tars")
        if remote.is_url(item) or Path(item).is_dir():
            tars += [remote.join(item, n) for n in names if n.endswith(".tar")]
        else:
            raise ConfigError(f"shards={item}: no such folder of tars")
    missing = [t for t in tars if not remote.is_file(t)]
    if missing:
        raise ConfigError(f"shards={spec}: {len(missing)} tar(s) missing, first {missing[0]}")
    if not tars:
        raise ConfigError(f"shards={spec}: no .tar files there")
    folders: dict[str, list[str]] = {}
    for t in dict.fromkeys(tars):
        folders.setdefault(remote.parent(t), []).append(t)
    return folders


_OPTS: InspectOptions | None = None


def _init_worker(opts: InspectOptions) -> None:
    global _OPTS
    _OPTS = opts
    pil_limits(opts.max_pixels).__enter__()  # for the life of the worker


def _work(location: str) -> list[dict[str, Any]]:
    assert _OPTS is not None
    return index_tar(location, _OPTS)


def _scan(tars: list[str], cfg: IndexConfig) -> Generator[list[dict[str, Any]], None, None]:
    """Rows of each tar, in the order of ``tars``, from ``cfg.workers`` processes."""
    opts = cfg.inspect_options()
    if cfg.workers == 1 or len(tars) == 1:
        with pil_limits(opts.max_pixels):
            for t in tars:
                yield index_tar(t, opts)
        return
    pool = mp.get_context("fork").Pool(min(cfg.workers, len(tars)), initializer=_init_worker, initargs=(opts,))
    try:
        yield from pool.imap(_work, tars)
    finally:
        pool.terminate()
        pool.join()


def _write(folder: str, name: str, write: Any) -> None:
    """Write ``folder/name`` atomically, locally or (through a temp file) to a URL."""
    if not remote.is_url(folder):
        write(Path(folder) / name)
        return
    with tempfile.TemporaryDirectory() as tmp:
        write(Path(tmp) / name)
        remote.upload(Path(tmp) / name, remote.join(folder, name))


def _summary(rows: list[dict[str, Any]], tars: list[str], cfg: IndexConfig) -> dict[str, Any]:
    def counts(values: Iterator[str]) -> dict[str, int]:
        out: dict[str, int] = {}
        for v in values:
            if v:
                out[v] = out.get(v, 0) + 1
        return dict(sorted(out.items()))

    per_tar = counts(r["shard"] for r in rows if r["status"] == "ok")
    return {
        "format": SHARDS_FORMAT,
        "written_by": "dataeff index",
        "num_files": len(rows),
        "num_samples": sum(per_tar.values()),
        "num_shards": len(tars),
        "shards": [{"file": remote.basename(t), "samples": per_tar.get(remote.basename(t), 0)} for t in tars],
        "counts_by_status": counts(r["status"] for r in rows),
        "counts_by_reason": counts(r["reason"].split(":")[0] for r in rows),
        "config": to_dict(cfg),
    }


def main(cfg: IndexConfig) -> list[dict[str, Any]]:
    """Index every folder of tars named by ``cfg.shards``.

    Returns:
        the summary of each folder (also written to ``<folder>/summary.json``).

    Raises:
        ConfigError: no tars, a missing tar, an http(s) location (read-only), a folder that
            already has an index (unless ``overwrite``), or a tar that is not a plain tar.
    """
    folders = _tar_folders(cfg.shards)
    for folder in folders:
        if remote.is_url(folder):
            remote.check_writable(folder)
        if not cfg.overwrite and remote.is_file(remote.join(folder, INDEX_NAME)):
            raise ConfigError(
                f"shards={cfg.shards}: {remote.join(folder, INDEX_NAME)} exists already; set overwrite=true to replace it"
            )
    summaries = []
    for folder, tars in folders.items():
        t0 = time.perf_counter()
        rows: list[dict[str, Any]] = []
        bar = tqdm(total=len(tars), unit="tar", desc=f"index {remote.basename(folder)}", disable=not cfg.progress)
        with contextlib.closing(_scan(tars, cfg)) as scanned:
            for tar_rows in scanned:
                rows += tar_rows
                bar.update(1)
        bar.close()
        mark_repeats(rows, cfg.keep_duplicates)
        summary = _summary(rows, tars, cfg)
        _write(folder, INDEX_NAME, lambda path, rows=rows: write_index(path, rows))
        _write(folder, SUMMARY_NAME, lambda path, s=summary: write_json_atomic(path, s, indent=1, sort_keys=True))
        log.info(
            "index: %d samples in %d tars -> %d ok %s in %.1f s -> %s",
            len(rows), len(tars), summary["num_samples"], summary["counts_by_status"],
            time.perf_counter() - t0, remote.join(folder, INDEX_NAME),
        )  # fmt: skip
        summaries.append(summary)
    return summaries
