"""``dataeff shard``: a tree of raw images -> WebDataset tar shards + ``index.parquet``.

Format: docs/architecture.md, "Shard directory" (``dataeff-shards/3``).

Design:
- every input file is inspected by a pure function of its bytes
  (:func:`dataeff.data.quality.inspect_bytes`): checksum, full decode, mode conversion,
  optional resize, quality statistics, image signatures (pixel sha256, pHash, thumbnail),
  and the bytes to store or a rejection reason;
- worker processes inspect files in parallel and also build each sample's tar members
  (the writer only appends bytes); results come back *in input order* (``Pool.imap``)
  and one writer packs them into shards, so keys, shard boundaries and tar bytes never
  depend on the number of workers;
- tar headers are fixed (mtime 0, uid/gid 0, no user names, mode 0444);
- each finished shard is renamed into place, then journalled in ``.parts/`` with the
  index rows it covers; a re-run after a kill keeps journalled shards, redoes the rest
  and ends with output identical to an uninterrupted run.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import json
import logging
import multiprocessing as mp
import os
import shutil
import signal
import tarfile
import time
from collections.abc import Generator, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from dataeff.config import ConfigError, option, to_dict
from dataeff.constants import (
    DUPLICATE_PREFIX,
    INDEX_NAME,
    QUALITY_KEYS,
    SHARDS_FORMAT,
    SIGNATURE_KEYS,
    SUMMARY_NAME,
)
from dataeff.data.integrity import Entry, Unread, read_input, scan_tree
from dataeff.data.keys import IMAGE_EXTENSIONS, is_image_name
from dataeff.data.quality import Inspected, InspectOptions, inspect_bytes, pil_limits, reject_unread
from dataeff.files import save_resolved, write_atomic, write_json_atomic

__all__ = [
    "ShardConfig", "main", "inspect_file", "scan_files", "list_files",
    "shard_name", "tar_member", "write_tar", "write_index", "TarSink",
]  # fmt: skip

log = logging.getLogger("dataeff")

_PARTS = ".parts"
#: Config keys that change how the job runs but not what it writes.
_RUN_ONLY = ("workers", "chunksize", "progress", "overwrite")
_BLOCK = tarfile.BLOCKSIZE
#: An index row and, for a sample to store, its tar members (see :func:`tar_member`).
Packed = tuple[dict[str, Any], bytes | None]


@dataclass
class ShardConfig:
    """Convert a raw image tree into WebDataset shards (``dataeff shard``)."""

    src: str = option("", help="root of the raw image tree (required)")
    out: str = option("", help="output shard directory, e.g. shards/<name> (required)")
    name: str = option("", help="shard file prefix: <name>-000000.tar; empty = the name of `out`")
    workers: int = option(2, help="worker processes decoding images (1 = in the main process)")
    chunksize: int = option(16, help="files handed to a worker at a time")
    samples_per_shard: int = option(1000, help="at most this many samples per tar")
    max_shard_mb: float = option(512.0, help="at most this many MiB per tar (a single bigger sample gets its own)")
    max_side: int = option(0, help="shrink images whose long side is larger to this many px (0 = keep size)")
    min_side: int = option(32, help="reject images whose short side is below this, px (too_small)")
    max_pixels: int = option(89_478_485, help="reject images with more pixels (decompression_bomb); 0 = no limit")
    max_bytes: int = option(
        1 << 28, help="reject files larger than this many bytes (too_large), checked before reading; 0 = no limit"
    )
    max_decoded_bytes: int = option(
        1 << 29,
        help="reject images whose decoded pixels take more bytes (decompression_bomb; 16-bit and every "
        "channel counted), checked before decoding; 0 = no limit",
    )
    jpeg_quality: int = option(95, help="JPEG quality when a JPEG source must be re-encoded")
    site_level: int = option(0, help="folder level below `src` naming the site/centre (0 = first folder)")
    extensions: list = option(list(IMAGE_EXTENSIONS), help="file extensions read as images (case-insensitive)")
    keep_duplicates: bool = option(
        False, help="also store exact duplicates (status ok, reason exact_duplicate_of:<key>)"
    )
    overwrite: bool = option(False, help="replace an output dir holding shards of other inputs or settings")
    progress: bool = option(True, help="show a progress bar")

    def __post_init__(self) -> None:
        if not self.src:
            raise ConfigError("src is required: the raw image tree, e.g. src=data/raw")
        if not self.out:
            raise ConfigError("out is required: the shard directory, e.g. out=shards/mydata")
        for key in ("workers", "chunksize", "samples_per_shard", "jpeg_quality"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{key}={getattr(self, key)}: must be at least 1")
        if self.max_shard_mb <= 0:
            raise ConfigError(f"max_shard_mb={self.max_shard_mb}: must be > 0")
        if self.jpeg_quality > 100:
            raise ConfigError(f"jpeg_quality={self.jpeg_quality}: must be in 1..100")
        for key in ("max_side", "min_side", "max_pixels", "max_bytes", "max_decoded_bytes", "site_level"):
            if getattr(self, key) < 0:
                raise ConfigError(f"{key}={getattr(self, key)}: must be >= 0")
        if not self.extensions or any(not str(e).startswith(".") for e in self.extensions):
            raise ConfigError(f"extensions={self.extensions}: give a non-empty list like ['.jpg', '.png']")

    def inspect_options(self) -> InspectOptions:
        return InspectOptions(
            min_side=self.min_side,
            max_pixels=self.max_pixels,
            max_bytes=self.max_bytes,
            max_decoded_bytes=self.max_decoded_bytes,
            max_side=self.max_side,
            jpeg_quality=self.jpeg_quality,
            site_level=self.site_level,
            extensions=tuple(str(e).lower() for e in self.extensions),
        )


# --------------------------------------------------------------------------- pure helpers


def shard_name(name: str, number: int) -> str:
    return f"{name}-{number:06d}.tar"


def starts_new_shard(count: int, nbytes: int, sample_bytes: int, max_count: int, max_bytes: int) -> bool:
    """Whether a sample of ``sample_bytes`` must open a new shard after ``count`` samples/``nbytes``."""
    return count > 0 and (count + 1 > max_count or nbytes + sample_bytes > max_bytes)


def scan_files(src: Path, exclude: Path | None = None) -> list[tuple[str, int]]:
    """``(relative POSIX path, size)`` of every path under ``src`` that gets an index row, sorted by path.

    Links to files count as files; links to folders are followed unless they loop; FIFOs,
    devices, sockets, broken links and loops are listed too (size 0), to be rejected with
    a reason (:func:`~dataeff.data.integrity.scan_tree`). ``exclude`` (the output folder,
    when it sits inside ``src``) is skipped.
    """
    return [(e.rel, e.size) for e in scan_tree(src, exclude)]


def list_files(src: Path, exclude: Path | None = None) -> list[str]:
    """Every path under ``src`` that gets an index row, POSIX relative, sorted (see :func:`scan_files`)."""
    return [rel for rel, _ in scan_files(src, exclude)]


def inspect_file(path: str | os.PathLike, rel: str, opts: InspectOptions) -> Inspected:
    """:func:`~dataeff.data.quality.inspect_bytes` on a file (under the PIL limits of ``opts``)."""
    with pil_limits(opts.max_pixels):
        return _inspect_path(os.fspath(path), rel, opts)


# --------------------------------------------------------------------------- workers


_WORKER_OPTS: InspectOptions | None = None


def _init_worker(opts: InspectOptions) -> None:
    global _WORKER_OPTS
    _WORKER_OPTS = opts
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and tears the pool down
    try:  # die with the parent (kill -9 of the job must not leave orphans decoding)
        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    pil_limits(opts.max_pixels).__enter__()  # for the life of the worker


def _inspect_path(path: str, rel: str, opts: InspectOptions, reason: str = "") -> Inspected:
    """Read and inspect one file, unless the listing gave a ``reason`` not to read it.

    A file that cannot be read (vanished, unreadable, no longer a regular file, over
    ``max_bytes``) is rejected with the reason :func:`~dataeff.data.integrity.read_input` gives.
    """
    if reason:
        return reject_unread(rel, 0, reason, opts)
    data = read_input(path, opts.max_bytes)
    if isinstance(data, Unread):
        return reject_unread(rel, data.size, data.reason, opts)
    return inspect_bytes(data, rel, opts)


def _packed(item: Inspected) -> Packed:
    """An inspected file as its index row and, when ok, its tar members (image + JSON) as bytes.

    The row's ``offset`` is where the image data starts inside these bytes (the packer
    adds the sample's position in its tar) and ``length`` its size in bytes.
    """
    if item.payload is None:
        item.row.update(offset=0, length=0)
        return item.row, None
    assert item.meta is not None
    key = item.row["key"]
    image = tar_member(f"{key}.{item.ext}", item.payload)
    item.row.update(offset=len(image) - _padded(len(item.payload)), length=len(item.payload))
    return item.row, image + tar_member(f"{key}.json", _sample_json(item.meta))


def _work(item: tuple[str, str, str]) -> Packed:
    assert _WORKER_OPTS is not None
    path, rel, reason = item
    return _packed(_inspect_path(path, rel, _WORKER_OPTS, reason))


def _inspected(src: Path, entries: Sequence[Entry], cfg: ShardConfig) -> Generator[Packed, None, None]:
    """Inspect and pack ``entries`` in order, in ``cfg.workers`` processes."""
    opts = cfg.inspect_options()
    root = str(src)
    items = [(os.path.join(root, e.rel), e.rel, e.reason) for e in entries]
    if cfg.workers == 1 or len(items) <= cfg.chunksize:
        with pil_limits(opts.max_pixels):
            for path, rel, reason in items:
                yield _packed(_inspect_path(path, rel, opts, reason))
        return
    # fork: workers need no re-import, and `python -m dataeff` has no __main__ guard for spawn.
    ctx = mp.get_context("fork")
    pool = ctx.Pool(cfg.workers, initializer=_init_worker, initargs=(opts,))
    try:
        yield from pool.imap(_work, items, chunksize=cfg.chunksize)
    finally:
        pool.terminate()
        pool.join()


# --------------------------------------------------------------------------- writing


def _tarfile_header(name: str, size: int) -> bytes:
    """A fixed tar header (GNU format: keys of deep paths exceed ustar's 100-character names)."""
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = size, 0, 0o444
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info.tobuf(tarfile.GNU_FORMAT, "utf-8", "surrogateescape")


_TEMPLATE = _tarfile_header("", 0)
_NAME_FIELD, _SIZE_FIELD, _CHKSUM_FIELD = slice(0, tarfile.LENGTH_NAME), slice(124, 136), slice(148, 156)


def _header(name: str, size: int) -> bytes:
    """:func:`_tarfile_header`, byte for byte, filled into a template when the name fits one block.

    Building a header through ``tarfile`` costs as much as decoding a thumbnail; the
    template only needs the name, the size and the checksum (the header's byte sum
    with the checksum field read as spaces).
    """
    raw = name.encode("utf-8", "surrogateescape")
    if len(raw) > _NAME_FIELD.stop or size >= 8**11:  # GNU long-name record / base-256 size
        return _tarfile_header(name, size)
    buf = bytearray(_TEMPLATE)
    buf[: len(raw)] = raw
    buf[_SIZE_FIELD] = b"%011o\0" % size
    buf[_CHKSUM_FIELD] = b" " * 8
    buf[_CHKSUM_FIELD.start : _CHKSUM_FIELD.stop - 1] = b"%06o\0" % sum(buf)
    return bytes(buf)


def _padded(n: int) -> int:
    return n + -n % _BLOCK


def tar_member(name: str, data: bytes) -> bytes:
    """One tar member: its header, then ``data`` padded to whole 512-byte blocks."""
    return b"".join((_header(name, len(data)), data, b"\0" * (-len(data) % _BLOCK)))


class TarSink:
    """A tar written member by member under ``<path>.tmp``, renamed to ``path`` on :meth:`commit`.

    Writes the same bytes as ``tarfile`` would (header, data padded to 512-byte blocks,
    two zero blocks, padding to a 10 KiB record) without its per-member copying.
    """

    def __init__(self, path: Path):
        self.path, self.tmp = path, path.with_name(path.name + ".tmp")
        self.fh = open(self.tmp, "wb")
        self.offset = 0

    def append(self, members: bytes) -> None:
        """Append whole members built by :func:`tar_member`."""
        self.fh.write(members)
        self.offset += len(members)

    def commit(self) -> int:
        """Finish the tar, move it into place, return its size in bytes."""
        end = self.offset + 2 * _BLOCK
        self.fh.write(b"\0" * (2 * _BLOCK + -end % tarfile.RECORDSIZE))
        self.fh.close()
        os.replace(self.tmp, self.path)
        return self.path.stat().st_size


def write_tar(path: Path, members: Iterable[tuple[str, bytes]]) -> list[tuple[int, int]]:
    """Write ``(name, bytes)`` members to ``path`` via a temp name.

    Returns:
        ``(offset, length)`` of each member's data in the tar, for the index.
    """
    sink = TarSink(path)
    spans = []
    for name, data in members:
        member = tar_member(name, data)
        spans.append((sink.offset + len(member) - _padded(len(data)), len(data)))
        sink.append(member)
    sink.commit()
    return spans


def _sample_json(meta: dict[str, Any]) -> bytes:
    return json.dumps(meta, sort_keys=True, separators=(",", ":")).encode()


def _write_json(path: Path, obj: Any, indent: int | None = 1) -> None:
    """Write JSON atomically; ``indent=None`` keeps the fast C encoder (journals are large)."""
    write_json_atomic(path, obj, indent=indent, sort_keys=True, separators=None if indent else (",", ":"))


_INDEX_COLUMNS = (
    ("key", "string"), ("source", "string"), ("site", "string"), ("status", "string"),
    ("reason", "string"), ("shard", "string"), ("size", "int64"), ("sha256", "string"),
    ("width", "int64"), ("height", "int64"), ("offset", "int64"), ("length", "int64"),
) + tuple((k, "float64") for k in QUALITY_KEYS) + tuple(
    zip(SIGNATURE_KEYS, ("string", "int64", "binary"), strict=True)
)  # fmt: skip


def write_index(path: Path, rows: list[dict[str, Any]]) -> None:
    """Write the index rows (already in index order) to parquet, atomically.

    A row without signatures (a rejected file, or a generated sample whose writer computes
    none) gets null ``pixel_sha256`` and ``thumb`` and ``phash`` 0: never null, because
    pandas reads a nullable int64 column with nulls as float64, which cannot hold 64 bits.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema([(name, getattr(pa, kind)()) for name, kind in _INDEX_COLUMNS])
    records = [{n: r.get(n) for n, _ in _INDEX_COLUMNS} for r in rows]
    for rec in records:
        if rec["phash"] is None:
            rec["phash"] = 0
    table = pa.Table.from_pylist(records, schema=schema)
    write_atomic(path, lambda tmp: pq.write_table(table, tmp))


def journal_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows as JSON can hold them: the thumbnail bytes as hex (:func:`restore_rows` undoes it)."""
    return [{**r, "thumb": r["thumb"].hex()} if r.get("thumb") is not None else r for r in rows]


def restore_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows read back from a JSON journal (the thumbnail hex as bytes again)."""
    for r in rows:
        if r.get("thumb") is not None:
            r["thumb"] = bytes.fromhex(r["thumb"])
    return rows


class _Packer:
    """Packs inspected files, in index order, into numbered shards and journals each one."""

    def __init__(
        self, out: Path, name: str, cfg: ShardConfig, done_rows: list[dict], done_shards: list[dict], start: int
    ):
        self.out, self.name, self.cfg = out, name, cfg
        self.max_bytes = int(cfg.max_shard_mb * 2**20)
        self.shards = list(done_shards)
        self.rows = list(done_rows)
        self.pos = start  # input position of the next file
        self.pending: list[dict] = []  # rows since the last journalled shard
        self.sink: TarSink | None = None  # the shard being written (streamed: no shard held in memory)
        self.count = self.nbytes = 0
        self.first_of: dict[str, str] = {}  # sha256 -> key of the first stored copy
        for r in self.rows:
            if r["status"] == "ok":
                self.first_of.setdefault(r["sha256"], r["key"])

    def add(self, row: dict[str, Any], members: bytes | None) -> None:
        store = row["status"] == "ok"
        if store:
            first = self.first_of.setdefault(row["sha256"], row["key"])
            if first != row["key"]:
                row["reason"] = f"{DUPLICATE_PREFIX}{first}"
                if not self.cfg.keep_duplicates:
                    row.update(status="duplicate", offset=0, length=0)
                    store = False
        if store:
            assert members is not None
            size = len(members)
            if starts_new_shard(self.count, self.nbytes, size, self.cfg.samples_per_shard, self.max_bytes):
                self.close()
            row["shard"] = shard_name(self.name, len(self.shards))
            if self.sink is None:
                self.sink = TarSink(self.out / row["shard"])
            row["offset"] += self.sink.offset
            self.sink.append(members)
            self.count, self.nbytes = self.count + 1, self.nbytes + size
        self.pending.append(row)
        self.pos += 1

    def close(self) -> None:
        """Write the current shard (if any samples) and journal it with the rows it covers."""
        if self.sink is None:
            return
        info: dict[str, Any] = {"file": self.sink.path.name, "samples": self.count, "bytes": self.sink.commit()}
        journal = {"shard": info, "rows": journal_rows(self.pending), "next": self.pos}
        _write_json(self.out / _PARTS / (info["file"] + ".json"), journal, indent=None)
        self.shards.append(info)
        self.rows += self.pending
        self.pending, self.sink, self.count, self.nbytes = [], None, 0, 0

    def finish(self) -> list[dict]:
        self.close()
        self.rows += self.pending
        self.pending = []
        return self.rows


def _signature(files: Sequence[str], sizes: Sequence[int], cfg: ShardConfig) -> str:
    """Hash of the input listing and of every setting that changes the output."""
    settings = {k: v for k, v in to_dict(cfg).items() if k not in _RUN_ONLY + ("src", "out")}
    settings["format"] = SHARDS_FORMAT  # output of an older layout is not resumed into this one
    h = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    for rel, size in zip(files, sizes, strict=True):
        h.update(os.fsencode(rel) + b"\0" + str(size).encode() + b"\n")
    return h.hexdigest()


def _number(file_name: str, name: str) -> int | None:
    """Shard number in ``<name>-000012.tar[.json][.tmp]``; None for other files."""
    stem = file_name[len(name) + 1 :].split(".")[0] if file_name.startswith(name + "-") else ""
    return int(stem) if stem.isdigit() else None


def _drop_shards(out: Path, name: str, first: int) -> None:
    """Remove shards numbered >= ``first``, their journals, and every temp file."""
    parts = out / _PARTS
    for f in [*out.glob(f"{name}-*.tar*"), *(parts.glob(f"{name}-*.tar.json*") if parts.is_dir() else [])]:
        n = _number(f.name, name)
        if f.name.endswith(".tmp") or (n is not None and n >= first):
            f.unlink()


def _clear(out: Path, name: str) -> None:
    """Remove everything this stage wrote in ``out`` (except the resolved config)."""
    _drop_shards(out, name, 0)
    shutil.rmtree(out / _PARTS, ignore_errors=True)
    for f in (INDEX_NAME, SUMMARY_NAME):
        (out / f).unlink(missing_ok=True)


def _resume(out: Path, name: str) -> tuple[list[dict], list[dict], int]:
    """Rows, shard infos and next input position of the journalled shards, in order.

    A shard counts as done when its journal exists and its tar has the journalled size
    (the tar is renamed into place before the journal is written); everything after
    the first shard that is not done is removed and redone.
    """
    rows: list[dict] = []
    shards: list[dict] = []
    start = 0
    while True:
        tar = out / shard_name(name, len(shards))
        journal = out / _PARTS / (tar.name + ".json")
        if not journal.is_file() or not tar.is_file():
            break
        rec = json.loads(journal.read_text())
        if tar.stat().st_size != rec["shard"]["bytes"]:
            break
        rows += restore_rows(rec["rows"])
        shards.append(rec["shard"])
        start = rec["next"]
    _drop_shards(out, name, len(shards))
    return rows, shards, start


def _summary(rows: list[dict], shards: list[dict], cfg: ShardConfig, name: str, signature: str) -> dict:
    by_status: dict[str, int] = {}
    by_reason: dict[str, int] = {}
    for r in rows:
        by_status[r["status"]] = by_status.get(r["status"], 0) + 1
        reason = r["reason"].split(":")[0]  # exact_duplicate_of:<key> -> exact_duplicate_of
        if reason:
            by_reason[reason] = by_reason.get(reason, 0) + 1
    return {
        "format": SHARDS_FORMAT,
        "name": name,
        "num_files": len(rows),
        "num_samples": sum(s["samples"] for s in shards),
        "num_shards": len(shards),
        "shards": shards,
        "counts_by_status": dict(sorted(by_status.items())),
        "counts_by_reason": dict(sorted(by_reason.items())),
        "signature": signature,
        "config": {k: v for k, v in to_dict(cfg).items() if k not in _RUN_ONLY},
    }


def main(cfg: ShardConfig) -> dict:
    """Shard ``cfg.src`` into ``cfg.out``; resume a killed run; skip a finished one.

    Returns:
        the summary (also written to ``<out>/summary.json``).

    Raises:
        ConfigError: ``src`` is not a directory, or ``out`` holds shards made from other
            inputs or settings and ``overwrite`` is false.
    """
    src, out = Path(cfg.src), Path(cfg.out)
    if not src.is_dir():
        raise ConfigError(f"src={cfg.src}: no such directory; give the folder of raw images to shard")
    name = cfg.name or out.resolve().name
    if not name or "/" in name or name.startswith("."):
        raise ConfigError(f"name={name!r}: give a plain file prefix, e.g. name=mydata")
    entries = scan_tree(src, exclude=out)
    if not any(is_image_name(e.rel, cfg.extensions) for e in entries):
        raise ConfigError(
            f"src={cfg.src}: no images under src (no file named {', '.join(cfg.extensions)}); "
            "give the folder of raw images to shard"
        )
    files = [e.rel for e in entries]
    signature = _signature(files, [e.size for e in entries], cfg)

    summary_path, plan_path = out / SUMMARY_NAME, out / _PARTS / "plan.json"
    for marker in (summary_path, plan_path):
        if not marker.is_file():
            continue
        record = json.loads(marker.read_text())
        previous = record.get("signature")
        if previous == signature and marker is summary_path and (out / INDEX_NAME).is_file():
            done = json.loads(summary_path.read_text())
            shutil.rmtree(out / _PARTS, ignore_errors=True)  # killed between the summary and this cleanup
            log.info(
                "shard: %s is already complete (%d samples in %d shards); skipping",
                out,
                done["num_samples"],
                done["num_shards"],
            )
            return done
        if previous != signature:
            if not cfg.overwrite:
                old_format = record.get("format", "unknown")
                why = (
                    f" (format {old_format}; this dataeff writes {SHARDS_FORMAT})"
                    if old_format != SHARDS_FORMAT
                    else ""
                )
                raise ConfigError(
                    f"out={cfg.out} holds shards made from other inputs or settings{why}; "
                    "choose another out or set overwrite=true to replace them"
                )
            log.info("shard: overwrite=true, removing the previous shards in %s", out)
            _clear(out, name)

    save_resolved(cfg, out)
    (out / _PARTS).mkdir(parents=True, exist_ok=True)
    if not plan_path.is_file():
        _write_json(plan_path, {"format": SHARDS_FORMAT, "signature": signature, "num_files": len(files)})
    done_rows, done_shards, start = _resume(out, name)
    if start:
        log.info("shard: resuming after %d finished shards (%d of %d files done)", len(done_shards), start, len(files))

    t0 = time.perf_counter()
    packer = _Packer(out, name, cfg, done_rows, done_shards, start)
    bar = tqdm(total=len(files), initial=start, unit="img", desc="shard", disable=not cfg.progress, smoothing=0.1)
    try:
        with contextlib.closing(_inspected(src, entries[start:], cfg)) as items:  # closing ends the pool
            for row, members in items:
                packer.add(row, members)
                bar.update(1)
        rows = packer.finish()
    finally:
        bar.close()
    assert len(rows) == len(files), "every input file must have exactly one index row"

    write_index(out / INDEX_NAME, rows)
    summary = _summary(rows, packer.shards, cfg, name, signature)
    _write_json(summary_path, summary)  # written last: its presence marks the output complete
    shutil.rmtree(out / _PARTS, ignore_errors=True)
    elapsed = time.perf_counter() - t0
    log.info(
        "shard: %d files -> %d samples in %d shards %s in %.1f s (%.0f images/s) -> %s",
        len(files), summary["num_samples"], summary["num_shards"], summary["counts_by_status"],
        elapsed, (len(files) - start) / max(elapsed, 1e-9), out,
    )  # fmt: skip
    return summary
