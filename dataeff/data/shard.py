"""``dataeff shard``: a tree of raw images -> WebDataset tar shards + ``index.parquet``.

Format: docs/architecture.md, "Shard directory" (``dataeff-shards/4``).

Design:
- every input file is inspected by a pure function of its bytes
  (:func:`dataeff.data.quality.inspect_bytes`): checksum, full decode, mode conversion,
  optional resize, quality statistics, image signatures (pixel sha256, pHash, thumbnail),
  and the bytes to store or a rejection reason;
- a multi-frame file (a video, a DICOM instance, a multi-page TIFF) expands into one sample
  per kept frame, each inspected the same way (:func:`inspect_source`,
  :mod:`dataeff.data.frames`), with its provenance (source, frame, timestamp) and group;
- worker processes inspect files in parallel and also build each sample's tar members
  (the writer only appends bytes); results come back *in input order* (``Pool.imap``)
  and one writer packs them into shards, so keys, shard boundaries and tar bytes never
  depend on the number of workers;
- tar headers are fixed (mtime 0, uid/gid 0, no user names, mode 0444);
- each finished shard is renamed into place, then journalled in ``.parts/`` with the
  index rows it covers and the input position after them (file, and rows of that file
  already written, since a video's frames may span two shards); a re-run after a kill keeps
  journalled shards, redoes the rest and ends with output identical to an uninterrupted run;
- no row is held once journalled: the index is written from the journals at the end, a
  few thousand rows at a time, so memory does not grow with the pool (bar one sha256 and
  key per stored image, for exact duplicates).
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import itertools
import json
import logging
import multiprocessing as mp
import os
import shutil
import signal
import tarfile
import time
from collections.abc import Callable, Generator, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from dataeff import outputs, provenance
from dataeff.config import ConfigError, option, section, to_dict
from dataeff.constants import (
    DUPLICATE_PREFIX,
    FRAMES_LOST_PREFIX,
    INDEX_NAME,
    PROVENANCE_KEYS,
    QUALITY_KEYS,
    SHARDS_FORMAT,
    SIGNATURE_KEYS,
    SUMMARY_NAME,
)
from dataeff.data.decode import is_tiff, tiff_page_count
from dataeff.data.dicom import DicomConfig, DicomInstance, is_dicom, require_pydicom
from dataeff.data.frames import FrameOptions, FrameSource, MediaRejected, TiffPages, inspect_frames
from dataeff.data.integrity import Entry, Unread, read_input, scan_tree
from dataeff.data.keys import IMAGE_EXTENSIONS, display_path, is_image_name, make_key
from dataeff.data.quality import Inspected, InspectOptions, inspect_bytes, pil_limits, reject_unread
from dataeff.data.video import VideoConfig, VideoFrames, require_av
from dataeff.files import file_sha256, save_resolved, write_atomic, write_json_atomic
from dataeff.lock import locked

__all__ = [
    "ShardConfig", "main", "inspect_file", "inspect_source", "scan_files", "list_files",
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
    out: str = option("", help="output shard directory, e.g. shards/<name>, or an s3:// / gs:// URL (required)")
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
    exif_transpose: bool = option(
        True, help="turn photos upright by their EXIF orientation (index column orientation records it)"
    )
    video: VideoConfig = section(VideoConfig, help="videos: which files, which frames become samples")
    dicom: DicomConfig = section(DicomConfig, help="DICOM: which files (frames sampled as video.*)")
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
            exif_transpose=self.exif_transpose,
        )

    def frame_options(self) -> FrameOptions:
        return FrameOptions(
            every_n=self.video.every_n,
            fps=self.video.fps,
            max_frames=self.video.max_frames,
            video_extensions=tuple(str(e).lower() for e in self.video.extensions),
            dicom_extensions=tuple(str(e).lower() for e in self.dicom.extensions),
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


def _frames(
    rel: str, source: FrameSource, opts: InspectOptions, key_base: str, group: str, lossy: bool, size: int
) -> list[Inspected]:
    """The frames of a multi-frame ``source`` as samples, plus a ``frames_lost:<n>`` row when some failed;
    the file's one rejected row when no frame decodes."""
    try:
        items = inspect_frames(rel, source, opts, key_base, group, lossy)
    except MediaRejected as exc:
        items = [reject_unread(rel, size, exc.reason, opts)]
    else:
        if source.lost:
            items.append(reject_unread(rel, size, f"{FRAMES_LOST_PREFIX}{source.lost}", opts))
    for item in items:
        item.row.setdefault("group", group)
    return items


def inspect_source(
    path: str | os.PathLike, rel: str, opts: InspectOptions, fopts: FrameOptions, reason: str = ""
) -> list[Inspected]:
    """Every index row of one input file: one for a still image, one per kept frame for a video,
    a DICOM instance or a multi-page TIFF (plus a ``frames_lost:<n>`` row when frames failed).

    Each row carries the provenance columns (docs/architecture.md): ``group`` (a still
    image's own source path, a video's or TIFF's path, a DICOM study's hash), ``frame`` (-1
    for a still image) and ``timestamp``. A file the listing gave a ``reason`` not to read
    gets that rejected row; a file over ``max_bytes`` is refused before it is read (videos,
    decoded as a stream, are not capped). Must run inside :func:`pil_limits`.
    """
    path = os.fspath(path)
    ext = os.path.splitext(rel)[1].lower()
    if reason:
        items = [reject_unread(rel, 0, reason, opts)]
    elif ext in fopts.video_extensions:
        try:
            size = os.path.getsize(path)
        except OSError:
            size = 0
        items = _frames(rel, VideoFrames(path, fopts), opts, make_key(rel), display_path(rel), True, size)
    else:
        data = read_input(path, opts.max_bytes)
        if isinstance(data, Unread):
            items = [reject_unread(rel, data.size, data.reason, opts)]
        elif is_dicom(data) or (data and ext in fopts.dicom_extensions):
            try:
                instance = DicomInstance(data, rel, fopts)
            except MediaRejected as exc:
                items = [reject_unread(rel, len(data), exc.reason, opts)]
            else:
                items = _frames(rel, instance, opts, instance.key_base, instance.group, False, len(data))
        elif is_tiff(data) and is_image_name(rel, opts.extensions) and tiff_page_count(data) > 1:
            items = _frames(rel, TiffPages(data, fopts), opts, make_key(rel), display_path(rel), False, len(data))
        else:
            items = [inspect_bytes(data, rel, opts)]
    for item in items:
        item.row.setdefault("group", item.row["source"])
        item.row.setdefault("frame", -1)
        item.row.setdefault("timestamp", None)
    return items


# --------------------------------------------------------------------------- workers


_WORKER_OPTS: tuple[InspectOptions, FrameOptions] | None = None


def _init_worker(opts: InspectOptions, fopts: FrameOptions) -> None:
    global _WORKER_OPTS
    _WORKER_OPTS = (opts, fopts)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and tears the pool down
    try:  # die with the parent (kill -9 of the job must not leave orphans decoding)
        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    pil_limits(opts.max_pixels).__enter__()  # for the life of the worker


def _inspect_path(path: str, rel: str, opts: InspectOptions, reason: str = "") -> Inspected:
    """Read and inspect one still image, unless the listing gave a ``reason`` not to read it.

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


def _work(item: tuple[str, str, str]) -> list[Packed]:
    assert _WORKER_OPTS is not None
    path, rel, reason = item
    return [_packed(i) for i in inspect_source(path, rel, *_WORKER_OPTS, reason=reason)]


def _inspected(src: Path, entries: Sequence[Entry], cfg: ShardConfig) -> Generator[list[Packed], None, None]:
    """Inspect and pack ``entries`` in order, in ``cfg.workers`` processes: the samples of each file."""
    opts, fopts = cfg.inspect_options(), cfg.frame_options()
    root = str(src)
    items = ((os.path.join(root, e.rel), e.rel, e.reason) for e in entries)  # made as the workers take them
    if cfg.workers == 1 or len(entries) <= cfg.chunksize:
        with pil_limits(opts.max_pixels):
            for path, rel, reason in items:
                yield [_packed(i) for i in inspect_source(path, rel, opts, fopts, reason=reason)]
        return
    # fork: workers need no re-import, and `python -m dataeff` has no __main__ guard for spawn.
    ctx = mp.get_context("fork")
    pool = ctx.Pool(cfg.workers, initializer=_init_worker, initargs=(opts, fopts))
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
        self.hash = hashlib.sha256()  # recorded, so a resume or skip can tell a damaged tar

    def append(self, members: bytes) -> None:
        """Append whole members built by :func:`tar_member`."""
        self.fh.write(members)
        self.hash.update(members)
        self.offset += len(members)

    def commit(self) -> int:
        """Finish the tar, move it into place, return its size in bytes."""
        end = self.offset + 2 * _BLOCK
        tail = b"\0" * (2 * _BLOCK + -end % tarfile.RECORDSIZE)
        self.fh.write(tail)
        self.hash.update(tail)
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
) + tuple(zip(PROVENANCE_KEYS, ("string", "int64", "float64", "int64"), strict=True))  # fmt: skip


_INDEX_SCHEMA = pa.schema([(name, getattr(pa, kind)()) for name, kind in _INDEX_COLUMNS])
#: Rows per row group of an index written in batches (a shard's rows at a time).
_INDEX_GROUP_ROWS = 1 << 16


def write_index(path: Path, rows: list[dict[str, Any]]) -> None:
    """Write the index rows (already in index order) to parquet, atomically.

    A row without signatures (a rejected file, or a generated sample whose writer computes
    none) gets null ``pixel_sha256`` and ``thumb`` and ``phash`` 0: never null, because
    pandas reads a nullable int64 column with nulls as float64, which cannot hold 64 bits.
    For the same reason a row without provenance gets ``group`` = its key, ``frame`` -1 and
    ``orientation`` 1 (a generated sample is its own group).
    """
    write_index_batches(path, [rows])


def write_index_batches(path: Path, batches: Iterable[list[dict[str, Any]]]) -> None:
    """Write the index from batches of rows (in index order), atomically, holding about
    :data:`_INDEX_GROUP_ROWS` rows at a time whatever the pool size (one row group each)."""

    def write(tmp: Path) -> None:
        held: list[pa.Table] = []
        count = 0
        with pq.ParquetWriter(tmp, _INDEX_SCHEMA) as writer:
            for rows in batches:
                held.append(_index_table(rows))
                count += len(rows)
                if count >= _INDEX_GROUP_ROWS:
                    writer.write_table(pa.concat_tables(held), row_group_size=_INDEX_GROUP_ROWS)
                    held, count = [], 0
            if held:
                writer.write_table(pa.concat_tables(held), row_group_size=_INDEX_GROUP_ROWS)

    write_atomic(path, write)


def _index_table(rows: list[dict[str, Any]]) -> pa.Table:
    """Index rows as a table of the index schema, defaults filled (see :func:`write_index`)."""
    records = [{n: r.get(n) for n, _ in _INDEX_COLUMNS} for r in rows]
    for rec in records:
        if rec["phash"] is None:
            rec["phash"] = 0
        for name, default in (("group", rec["key"]), ("frame", -1), ("orientation", 1)):
            if rec[name] is None:
                rec[name] = default
    return pa.Table.from_pylist(records, schema=_INDEX_SCHEMA)


def journal_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows as JSON can hold them: the thumbnail bytes as hex (:func:`restore_rows` undoes it)."""
    return [{**r, "thumb": r["thumb"].hex()} if r.get("thumb") is not None else r for r in rows]


def restore_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows read back from a JSON journal (the thumbnail hex as bytes again)."""
    for r in rows:
        if r.get("thumb") is not None:
            r["thumb"] = bytes.fromhex(r["thumb"])
    return rows


class _Tally:
    """The summary's counts of index rows, added a batch at a time (no row is kept)."""

    def __init__(self) -> None:
        self.rows, self.frame_rows, self.frames_lost = 0, 0, 0
        self.by_status: dict[str, int] = {}
        self.by_reason: dict[str, int] = {}
        self.frame_sources: set[str] = set()  # multi-frame files with a decoded frame

    def add(self, rows: Iterable[dict[str, Any]]) -> None:
        for r in rows:
            self.rows += 1
            if r["frame"] >= 0:
                self.frame_rows += 1
                self.frame_sources.add(r["source"])
            elif r["reason"].startswith(FRAMES_LOST_PREFIX):
                self.frames_lost += int(r["reason"][len(FRAMES_LOST_PREFIX) :])
            self.by_status[r["status"]] = self.by_status.get(r["status"], 0) + 1
            reason = r["reason"].split(":")[0]  # exact_duplicate_of:<key> -> exact_duplicate_of
            if reason:
                self.by_reason[reason] = self.by_reason.get(reason, 0) + 1


class _Packer:
    """Packs inspected files, in index order, into numbered shards and journals each one.

    Rows are not kept once journalled: the index is written from the journals at the end
    (:func:`journalled_rows`), so memory does not grow with the pool, bar one sha256 and
    key per stored image for exact-duplicate detection.
    """

    def __init__(self, out: Path, name: str, cfg: ShardConfig, done_shards: list[dict], start: tuple[int, int]):
        self.out, self.name, self.cfg = out, name, cfg
        self.on_shard: Callable[[Path], None] | None = None
        self.max_bytes = int(cfg.max_shard_mb * 2**20)
        self.shards = list(done_shards)
        self.pos, self.sub = start  # input position of the next file; its rows already added
        self.pending: list[dict] = []  # rows since the last journalled shard
        self.sink: TarSink | None = None  # the shard being written (streamed: no shard held in memory)
        self.count = self.nbytes = 0
        self.tally = _Tally()
        self.first_of: dict[str, str] = {}  # sha256 -> key of the first stored copy
        for rows in journalled_rows(out, self.shards):
            self.tally.add(rows)
            for r in rows:
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
        self.sub += 1

    def next_file(self) -> None:
        """Every row of the current input file was added."""
        self.pos, self.sub = self.pos + 1, 0

    def close(self) -> None:
        """Write the current shard (if any samples) and journal it with the rows it covers."""
        if self.sink is None:
            return
        info: dict[str, Any] = {"file": self.sink.path.name, "samples": self.count, "bytes": self.sink.commit()}
        info["sha256"] = self.sink.hash.hexdigest()
        journal = {"shard": info, "rows": journal_rows(self.pending), "next": self.pos, "skip": self.sub}
        _write_json(self.out / _PARTS / (info["file"] + ".json"), journal, indent=None)
        if self.on_shard is not None:  # e.g. upload it (dataeff.data.remote_shard)
            self.on_shard(self.out / info["file"])
        self.shards.append(info)
        self.tally.add(self.pending)
        self.pending, self.sink, self.count, self.nbytes = [], None, 0, 0

    def finish(self) -> list[dict]:
        """Close the last shard; returns the rows after it (rejected files: in no shard, no journal)."""
        self.close()
        tail, self.pending = self.pending, []
        self.tally.add(tail)
        return tail


def journalled_rows(out: Path, shards: Sequence[dict]) -> Iterator[list[dict]]:
    """The index rows of each journalled shard, in order, read back one journal at a time."""
    for info in shards:
        yield restore_rows(json.loads((out / _PARTS / (info["file"] + ".json")).read_text())["rows"])


def _signature(files: Sequence[str], sizes: Sequence[int], cfg: ShardConfig) -> str:
    """Hash of the input listing and of every setting that changes the output."""
    settings = {k: v for k, v in to_dict(cfg).items() if k not in _RUN_ONLY + ("src", "out")}
    settings["format"] = SHARDS_FORMAT  # output of an older layout is not resumed into this one
    h = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    for rel, size in zip(files, sizes, strict=True):
        h.update(os.fsencode(rel) + b"\0" + str(size).encode() + b"\n")
    return h.hexdigest()


def _settings(cfg: ShardConfig) -> dict[str, Any]:
    """The settings a shard directory records (every key but the run-only ones)."""
    return {k: v for k, v in to_dict(cfg).items() if k not in _RUN_ONLY}


def _what_differs(record: dict[str, Any], cfg: ShardConfig) -> str:
    """The first recorded setting that differs from ``cfg`` (``src`` and ``out`` aside), else the input files."""
    old, new = dict(record.get("config") or {}), _settings(cfg)
    for key in ("src", "out"):
        old.pop(key, None)
        new.pop(key, None)
    if old:
        what = provenance.difference({"config": old}, {"config": new})
        if what is not None:
            return f"other settings: {what}"
    return "other input files (files under src added, removed or resized)"


def _sources_changed(src: Path, rows: Iterable[dict], cfg: ShardConfig) -> bool:
    """Whether a still image already sharded (a row without a frame) now holds other bytes than its sha256.

    A frame's sha256 is that of the stored frame, not of its video, so multi-frame files are
    judged by the settings signature (path and size) only.

    Raises:
        ConfigError: it does and ``overwrite`` is false.
    """
    stills = ((r["source"], r["sha256"]) for r in rows if r.get("frame", -1) < 0 and r.get("sha256"))
    changed = next((rel for rel, sha in stills if outputs.changed_file(src, [rel], [sha])), None)
    if changed is None:
        return False
    if not cfg.overwrite:
        raise ConfigError(
            f"src file {changed} changed since it was sharded into out={cfg.out} (its sha256 differs from the "
            "recorded one); set overwrite=true to shard the tree again, or restore the file"
        )
    log.info("shard: %s changed since it was sharded; overwrite=true, sharding again", changed)
    return True


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


def _intact(out: Path, info: dict) -> bool:
    """Whether a shard's tar has the size and sha256 recorded for it (size only in older records)."""
    tar = out / info["file"]
    if not tar.is_file() or tar.stat().st_size != info["bytes"]:
        return False
    return "sha256" not in info or file_sha256(tar) == info["sha256"]


def _resume(out: Path, name: str, intact: Callable[[Path, dict], bool]) -> tuple[list[dict], tuple[int, int]]:
    """Shard infos and next input position of the journalled shards, in order (rows: :func:`journalled_rows`).

    The position is (next input file, rows of that file already journalled): a
    multi-frame file's samples may end one shard and start the next.

    A shard counts as done when its journal exists and its tar has the journalled size
    and sha256 (the tar is renamed into place before the journal is written); everything
    after the first shard that is not done is removed and redone.
    """
    shards: list[dict] = []
    start = (0, 0)
    while True:
        tar = out / shard_name(name, len(shards))
        journal = out / _PARTS / (tar.name + ".json")
        if not journal.is_file() or not tar.is_file():
            break
        rec = json.loads(journal.read_text())
        if not intact(out, rec["shard"]):
            break
        shards.append(rec["shard"])
        start = (rec["next"], rec["skip"])
    _drop_shards(out, name, len(shards))
    return shards, start


def _summary(tally: _Tally, num_files: int, shards: list[dict], cfg: ShardConfig, name: str, signature: str) -> dict:
    return {
        "format": SHARDS_FORMAT,
        "name": name,
        "num_files": num_files,
        "num_rows": tally.rows,
        "num_samples": sum(s["samples"] for s in shards),
        # multi-frame files with a decoded frame, their frame rows, frames that could not be decoded
        "frames": {"files": len(tally.frame_sources), "rows": tally.frame_rows, "lost": tally.frames_lost},
        "num_shards": len(shards),
        "shards": shards,
        "counts_by_status": dict(sorted(tally.by_status.items())),
        "counts_by_reason": dict(sorted(tally.by_reason.items())),
        "signature": signature,
        "config": _settings(cfg),
    }


def _require_readers(files: Sequence[str], fopts: FrameOptions) -> None:
    """Fail before any work when the tree holds videos or DICOM files and their reader is not installed."""
    exts = {os.path.splitext(rel)[1].lower() for rel in files}
    if exts & set(fopts.video_extensions):
        require_av()
    if exts & set(fopts.dicom_extensions):
        require_pydicom()


@locked("shard")
def main(
    cfg: ShardConfig,
    on_shard: Callable[[Path], None] | None = None,
    intact: Callable[[Path, dict], bool] | None = None,
) -> dict:
    """Shard ``cfg.src`` into ``cfg.out``; resume a killed run; skip a finished one.

    ``on_shard`` is called with each finished, journalled tar; ``intact`` replaces the
    size + sha256 check of a finished tar (for tars whose bytes live elsewhere).

    Returns:
        the summary (also written to ``<out>/summary.json``).

    Raises:
        ConfigError: ``src`` is not a directory, or ``out`` holds shards made from other
            inputs or settings and ``overwrite`` is false.
    """
    src, out = Path(cfg.src), Path(cfg.out)
    intact = intact or _intact
    if not src.is_dir():
        raise ConfigError(f"src={cfg.src}: no such directory; give the folder of raw images to shard")
    name = cfg.name or out.resolve().name
    if not name or "/" in name or name.startswith("."):
        raise ConfigError(f"name={name!r}: give a plain file prefix, e.g. name=mydata")
    entries = scan_tree(src, exclude=out)
    fopts = cfg.frame_options()
    inputs = (*cfg.extensions, *fopts.video_extensions, *fopts.dicom_extensions)
    if not any(is_image_name(e.rel, inputs) for e in entries):
        raise ConfigError(
            f"src={cfg.src}: no images under src (no file named {', '.join(inputs)}); "
            "give the folder of raw images, videos or DICOM files to shard"
        )
    files = [e.rel for e in entries]
    _require_readers(files, fopts)
    signature = _signature(files, [e.size for e in entries], cfg)

    summary_path, plan_path = out / SUMMARY_NAME, out / _PARTS / "plan.json"
    for marker in (summary_path, plan_path):
        if not marker.is_file():
            continue
        record = json.loads(marker.read_text())
        previous = record.get("signature")
        if previous == signature and marker is summary_path and (out / INDEX_NAME).is_file():
            import pandas as pd

            done = json.loads(summary_path.read_text())
            index = pd.read_parquet(out / INDEX_NAME, columns=["source", "frame", "sha256"])
            rows = (
                {"source": s, "frame": f, "sha256": h}
                for s, f, h in zip(index["source"], index["frame"], index["sha256"], strict=True)
            )
            changed = _sources_changed(src, rows, cfg)
            damaged = next((s["file"] for s in done["shards"] if not intact(out, s)), None)
            if not changed and damaged is None:
                shutil.rmtree(out / _PARTS, ignore_errors=True)  # killed between the summary and this cleanup
                log.info(
                    "shard: %s is already complete (%d samples in %d shards); skipping",
                    out,
                    done["num_samples"],
                    done["num_shards"],
                )
                return done
            if damaged is not None:
                log.warning("shard: %s differs from its recorded size or sha256; sharding again", out / damaged)
            _clear(out, name)
            continue
        if previous != signature:
            if not cfg.overwrite:
                old_format = record.get("format", "unknown")
                why = (
                    f" (format {old_format}; this dataeff writes {SHARDS_FORMAT})"
                    if old_format != SHARDS_FORMAT
                    else ""
                )
                raise ConfigError(
                    f"out={cfg.out} holds shards made with {_what_differs(record, cfg)}{why}; "
                    "choose another out or set overwrite=true to replace them"
                )
            log.info("shard: overwrite=true, removing the previous shards in %s", out)
            _clear(out, name)

    save_resolved(cfg, out)
    (out / _PARTS).mkdir(parents=True, exist_ok=True)
    if not plan_path.is_file():
        plan = {"format": SHARDS_FORMAT, "signature": signature, "num_files": len(files), "config": _settings(cfg)}
        _write_json(plan_path, plan)
    done_shards, (start, skip) = _resume(out, name, intact)
    if (start or skip) and _sources_changed(src, itertools.chain.from_iterable(journalled_rows(out, done_shards)), cfg):
        _drop_shards(out, name, 0)
        done_shards, (start, skip) = [], (0, 0)
    if start or skip:
        log.info("shard: resuming after %d finished shards (%d of %d files done)", len(done_shards), start, len(files))

    t0 = time.perf_counter()
    packer = _Packer(out, name, cfg, done_shards, (start, skip))
    packer.on_shard = on_shard  # called with each finished, journalled tar
    bar = tqdm(total=len(files), initial=start, unit="file", desc="shard", disable=not cfg.progress, smoothing=0.1)
    try:
        with contextlib.closing(_inspected(src, entries[start:], cfg)) as items:  # closing ends the pool
            for samples in items:
                for row, members in samples[skip:]:  # skip: rows of a file journalled before a kill
                    if row["reason"].startswith(FRAMES_LOST_PREFIX):
                        lost = row["reason"][len(FRAMES_LOST_PREFIX) :]
                        log.warning("shard: %s: %s frame(s) could not be decoded; kept the others", row["source"], lost)
                    packer.add(row, members)
                packer.next_file()
                skip = 0
                bar.update(1)
        tail = packer.finish()
    finally:
        bar.close()
    assert packer.pos == len(files), "every input file must be inspected exactly once"

    write_index_batches(out / INDEX_NAME, itertools.chain(journalled_rows(out, packer.shards), [tail]))
    summary = _summary(packer.tally, len(files), packer.shards, cfg, name, signature)
    _write_json(summary_path, summary)  # written last: its presence marks the output complete
    shutil.rmtree(out / _PARTS, ignore_errors=True)
    elapsed = time.perf_counter() - t0
    log.info(
        "shard: %d files -> %d samples in %d shards %s in %.1f s (%.0f files/s) -> %s",
        len(files), summary["num_samples"], summary["num_shards"], summary["counts_by_status"],
        elapsed, (len(files) - start) / max(elapsed, 1e-9), out,
    )  # fmt: skip
    return summary
