"""Reading shard sets: shard lists, the index, safe sample decoding, transforms, selections.

A shard set is a directory written by ``dataeff shard`` or indexed by ``dataeff index``
(``<name>-%06d.tar`` plus ``index.parquet``), several such directories joined by ``,``,
or a brace pattern ``dir/name-{000000..000009}.tar``; each may be a local path or an
``s3://``, ``gs://`` or ``http(s)://`` URL (:mod:`dataeff.data.remote`). Samples are
decoded from their image (jpg/png/webp) and JSON members only: any other member
(``.pyd``, ``.pickle``, ``.pth`` ...) is never even read, so an untrusted shard cannot
trigger pickle.

Samples are read at the offsets of the index. From a URL, the samples one reader needs
from one tar are fetched with one ranged request per run of nearby samples
(:func:`coalesce`: gaps up to :data:`MAX_GAP` bytes are read through, a request holds at
most :data:`MAX_REQUEST` bytes), never one request per sample.

Epoch planning is pure (``plan_epoch``, ``full_batches``, ``shuffle_order``, ``worker_batches``:
integers in, index arrays out) and ``StreamDataset`` is the
thin streaming shell over it; see ``PretrainDataModule`` for the design.
"""

from __future__ import annotations

import io
import json
import logging
import os
import tarfile
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import torch
from braceexpand import braceexpand
from PIL import Image
from torch.utils.data import Dataset, IterableDataset, default_collate, get_worker_info
from torchvision import transforms as T
from webdataset.tariterators import base_plus_ext, tar_file_iterator

from dataeff.config import ConfigError, DataConfig, first_line
from dataeff.constants import GENERATED_DIR, IMAGENET_MEAN, IMAGENET_STD, INDEX_NAME
from dataeff.data import remote
from dataeff.select.manifest import read_selection

log = logging.getLogger("dataeff")

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
# The only members ever read from a tar; everything else is skipped unread.
DECODED_EXTS = frozenset(IMAGE_EXTS + ("json",))
#: Remote reads: a gap of at most this many bytes between two needed samples is read
#: through (one request is worth megabytes of transfer); one request reads at most MAX_REQUEST.
MAX_GAP = 2 * 2**20
MAX_REQUEST = 64 * 2**20


class DamagedShardError(ConfigError):
    """A tar or its index is damaged: unparsable, cut short, or disagreeing with each other.

    An input error (``dataeff`` exits 2), one line naming the file. A DataLoader re-raises
    a worker's exception as ``type(exc)("Caught ... Original Traceback ...")``; the
    original line is the traceback's last one, so it is taken back from there.
    """

    def __init__(self, message: str) -> None:
        if message.startswith("Caught ") and "Traceback" in message:
            message = message.strip().splitlines()[-1].split(": ", 1)[-1]
        super().__init__(message)


_RESHARD = "re-run 'dataeff shard' (or 'dataeff index') with overwrite=true"


# --------------------------------------------------------------------------- shard sets


def _tars_of_dir(directory: str) -> list[str]:
    index = remote.join(directory, INDEX_NAME)
    if not remote.is_file(index):
        raise ValueError(
            f"shard directory {directory} has no {INDEX_NAME}: point data.shards at a directory "
            "written by 'dataeff shard' or indexed by 'dataeff index'"
        )
    if remote.is_url(directory):
        # Object stores and HTTP servers need not list folders: the index names the tars.
        names = sorted(set(read_index(directory)["shard"].dropna()) - {""})
        tars = [remote.join(directory, n) for n in names]
        _check_present(tars)
    else:
        tars = sorted(str(p) for p in Path(directory).glob("*.tar"))
    if not tars:
        raise ValueError(f"empty shard set: no .tar files in {directory}")
    return tars


def _check_present(tars: list[str]) -> None:
    """Refuse tars missing from their folder (one listing per folder; plain HTTP cannot list, so it is skipped)."""
    by_dir: dict[str, list[str]] = {}
    for t in tars:
        by_dir.setdefault(remote.parent(t), []).append(t)
    for folder, members in by_dir.items():
        names = remote.list_names(folder)
        if names is None:
            continue
        missing = [t for t in members if remote.basename(t) not in set(names)]
        if missing:
            raise ValueError(f"shard set {folder}: {len(missing)} tar(s) missing, first {missing[0]}")


def _is_dir_spec(item: str) -> bool:
    if remote.is_url(item):
        return "{" not in item and not item.endswith(".tar")
    return Path(item).is_dir()


def list_shards(spec: str) -> list[str]:
    """Tar paths named by a shard spec, in order, without duplicates.

    Args:
        spec: a shard directory, several joined by ``,``, or a brace pattern
            such as ``shards/pool/pool-{000000..000009}.tar`` (items may mix); each a
            local path or a URL (``s3://``, ``gs://``, ``http(s)://``).

    Raises:
        ValueError: naming the path, for an empty spec, a missing directory or tar,
            a directory without ``index.parquet`` or with no tars ("empty shard set").
        RemoteInputError: a URL that cannot be read (access denied, ...).
    """
    items = [s.strip() for s in str(spec).split(",") if s.strip()] if "{" not in spec else [spec.strip()]
    if not items:
        raise ValueError("empty shard set: data.shards is empty; give a shard directory or a brace pattern")
    out: list[str] = []
    for item in items:
        if _is_dir_spec(item):
            out += _tars_of_dir(item)
            continue
        expanded = list(braceexpand(item))
        if len(expanded) == 1 and not item.endswith(".tar"):
            raise ValueError(f"empty shard set: {item} is neither a shard directory nor a .tar pattern")
        if remote.is_url(item):
            _check_present(expanded)
        else:
            missing = [p for p in expanded if not Path(p).is_file()]
            if missing:
                raise ValueError(f"shard set {item}: {len(missing)} tar(s) missing, first {missing[0]}")
        indexed: dict[str, bool] = {}
        for p in expanded:
            folder = remote.parent(p)
            if folder not in indexed:
                indexed[folder] = remote.is_file(remote.join(folder, INDEX_NAME))
            if not indexed[folder]:
                raise ValueError(f"shard {p}: no {INDEX_NAME} beside it; run 'dataeff shard' or 'dataeff index'")
        out += expanded
    return list(dict.fromkeys(out))  # first occurrence of each path, in order


def read_index(shard_dir: str | os.PathLike, columns: Sequence[str] | None = None) -> pd.DataFrame:
    """The ``index.parquet`` of a shard directory (one row per input file, in tar order).

    ``columns``: only those of them the index has (an older index lacks newer columns), else all.
    """
    path = remote.join(shard_dir, INDEX_NAME)
    if not remote.is_file(path):
        raise ValueError(
            f"no {INDEX_NAME} in {shard_dir}: run 'dataeff shard' on the raw images, or 'dataeff index' on "
            "WebDataset shards, first"
        )
    try:
        source = io.BytesIO(remote.read_bytes(path)) if remote.is_url(path) else path
        if columns is not None:
            names = set(pq.read_schema(source).names)
            columns = [c for c in columns if c in names]
            if isinstance(source, io.BytesIO):
                source.seek(0)
        return pd.read_parquet(source, columns=columns)
    except (OSError, ValueError) as exc:  # pyarrow's errors for a cut or overwritten file are both kinds
        raise DamagedShardError(f"{path}: unreadable index ({first_line(exc)}); {_RESHARD}") from None


def check_spans(index_path: str, tar: str, samples: pd.DataFrame) -> None:
    """Refuse index rows whose image bytes cannot lie inside ``tar``.

    Each image starts after its 512-byte tar header, on a block boundary, and ends
    inside the file; anything else (a negative or huge offset or length) would make a
    reader seek before the file or allocate the length.

    Raises:
        DamagedShardError: naming the index, the first bad sample and the tar.
    """
    offset, length = samples["offset"].to_numpy(), samples["length"].to_numpy()
    if not (np.issubdtype(offset.dtype, np.integer) and np.issubdtype(length.dtype, np.integer)):
        raise DamagedShardError(f"{index_path}: offset/length are not integers; the index is damaged, {_RESHARD}")
    size = remote.size(tar)
    bad = (offset < tarfile.BLOCKSIZE) | (offset % tarfile.BLOCKSIZE != 0) | (length < 0) | (offset + length > size)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise DamagedShardError(
            f"{index_path}: sample {samples['key'].iloc[i]} has offset {offset[i]}, length {length[i]}, outside "
            f"{remote.basename(tar)} ({size} bytes) or off its 512-byte blocks; the index or the tar is damaged, {_RESHARD}"
        )


def shard_samples(tars: list[str]) -> list[pd.DataFrame]:
    """For each tar, its ``ok`` samples in tar order, from the index beside it.

    The index is the source of truth for counts, which is what lets every rank agree on
    the epoch plan without opening a single tar, and for where each image is stored.

    Returns:
        one frame per tar with columns ``key``, ``offset``, ``length`` (the image bytes
        in the tar).
    """
    by_dir: dict[str, dict[str, pd.DataFrame]] = {}
    empty = pd.DataFrame({"key": [], "offset": [], "length": []})
    out = []
    for tar in tars:
        directory = remote.parent(tar)
        if directory not in by_dir:
            index = read_index(directory)
            missing = sorted({"offset", "length"} - set(index.columns))
            if missing:
                raise ValueError(
                    f"{remote.join(directory, INDEX_NAME)} has no {' or '.join(missing)} column (written by an "
                    "older dataeff): re-run 'dataeff shard' on the raw images with overwrite=true"
                )
            ok = index.loc[index["status"] == "ok", ["key", "shard", "offset", "length"]]
            by_dir[directory] = {name: g.drop(columns="shard") for name, g in ok.groupby("shard", sort=False)}
        samples = by_dir[directory].get(remote.basename(tar), empty).reset_index(drop=True)
        if len(samples):
            check_spans(remote.join(directory, INDEX_NAME), tar, samples)
        out.append(samples)
    return out


def shard_keys(tars: list[str]) -> list[list[str]]:
    """For each tar, the keys of its ``ok`` samples in tar order (see :func:`shard_samples`)."""
    return [list(samples["key"]) for samples in shard_samples(tars)]


def read_member(fh: BinaryIO, path: str, key: str, offset: int, length: int) -> bytes:
    """The image bytes of sample ``key`` at ``offset`` of an open tar, checked against their header.

    Raises:
        DamagedShardError: the span lies outside the tar, or the tar holds something else
            there (the shard and its index disagree).
    """
    if offset < tarfile.BLOCKSIZE or length < 0 or offset + length > os.fstat(fh.fileno()).st_size:
        raise DamagedShardError(
            f"{path}: sample {key} at byte {offset}, length {length}, lies outside the tar; "
            f"the shard and its index disagree, {_RESHARD}"
        )
    fh.seek(offset - tarfile.BLOCKSIZE)
    return checked_member(fh.read(tarfile.BLOCKSIZE + length), path, key, offset, length)


def checked_member(block: bytes, path: str, key: str, offset: int, length: int) -> bytes:
    """The data of a member read with its header (``block`` starts 512 bytes before ``offset``), checked.

    Raises:
        ValueError: the header is not that of ``key``'s member of ``length`` bytes.
    """
    name = f"{key}.".encode()[: tarfile.LENGTH_NAME]  # a long name's header keeps its first 100 bytes
    try:
        size = int(block[124:136].strip(b"\0 ") or b"-1", 8)
    except ValueError:
        size = -1
    if len(block) != tarfile.BLOCKSIZE + length or not block.startswith(name) or size != length:
        raise DamagedShardError(
            f"{path}: no image of sample {key} at byte {offset}; the shard and its index disagree, {_RESHARD}"
        )
    return block[tarfile.BLOCKSIZE :]


def coalesce(starts: np.ndarray, ends: np.ndarray, max_gap: int, max_bytes: int) -> list[tuple[int, int]]:
    """Group byte spans (sorted by start) into requests: ``[i, j)`` index ranges, one request each.

    A span joins the current request when the gap before it is at most ``max_gap`` bytes
    and the request stays within ``max_bytes`` (a single larger span gets its own).
    """
    groups: list[tuple[int, int]] = []
    first = 0
    for i in range(1, len(starts)):
        if starts[i] - ends[i - 1] > max_gap or ends[i] - starts[first] > max_bytes:
            groups.append((first, i))
            first = i
    if len(starts):
        groups.append((first, len(starts)))
    return groups


def read_samples(tar: str, keys: Sequence[str], spans: np.ndarray, picks: Sequence[int]) -> Iterator[bytes]:
    """Image bytes of samples ``picks`` (increasing positions in the tar) of ``tar``, in order.

    A local tar is read with one seek per sample; a URL with one ranged request per
    group of :func:`coalesce` (``MAX_GAP``, ``MAX_REQUEST``), each checked against its header.

    Args:
        keys: the keys of the tar's samples; ``spans[j]`` = (offset, length) of ``keys[j]``'s image.
        picks: indices into ``keys``, increasing.
    """
    if not remote.is_url(tar):
        with open(tar, "rb") as fh:
            for j in picks:
                yield read_member(fh, tar, keys[j], int(spans[j, 0]), int(spans[j, 1]))
        return
    idx = np.asarray(picks, dtype=np.int64)
    starts = spans[idx, 0] - tarfile.BLOCKSIZE
    ends = spans[idx, 0] + spans[idx, 1]
    for a, b in coalesce(starts, ends, MAX_GAP, MAX_REQUEST):
        lo = int(starts[a])
        data = remote.read_range(tar, lo, int(ends[b - 1]))
        for i in range(a, b):
            j = int(idx[i])
            block = data[int(starts[i]) - lo : int(ends[i]) - lo]
            yield checked_member(block, tar, keys[j], int(spans[j, 0]), int(spans[j, 1]))


# --------------------------------------------------------------------------- samples


def decode_image(data: bytes, where: str) -> Image.Image:
    """A stored sample's image bytes as RGB; damaged bytes raise :class:`DamagedShardError` naming ``where``."""
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except Exception as exc:  # PIL raises many types for corrupt data
        raise DamagedShardError(
            f"{where}: undecodable image ({exc.__class__.__name__}: {first_line(exc)}); the shard is damaged, {_RESHARD}"
        ) from None
    return image.convert("RGB")


def _iter_members(path: str, keys: set[str] | None = None) -> Iterator[tuple[str, dict[str, bytes]]]:
    """``(key, {ext: bytes})`` per sample of a tar, image and JSON members only, in tar order."""

    def wanted(fname: str) -> bool:
        key, ext = base_plus_ext(fname)
        if key is None or ext is None or ext.lower() not in DECODED_EXTS:
            return False
        return keys is None or key in keys

    current: str | None = None
    fields: dict[str, bytes] = {}
    with remote.open_stream(path) as stream:
        members = tar_file_iterator(stream, select_files=wanted)
        while True:
            try:
                member = next(members, None)
            except remote.RemoteUnavailable:
                raise  # the store, not the tar
            except (tarfile.TarError, EOFError, OSError) as exc:
                raise DamagedShardError(
                    f"{path}: damaged tar ({first_line(exc).split(' @ ')[0]}); {_RESHARD}"
                ) from None
            if member is None:
                break
            key, ext = base_plus_ext(member["fname"])
            if key != current:
                if current is not None:
                    yield current, fields
                current, fields = key, {}
            fields[ext.lower()] = member["data"]
    if current is not None:
        yield current, fields


def image_bytes(fields: dict[str, bytes]) -> bytes | None:
    """The image member of a sample's fields, or None."""
    return next((fields[e] for e in IMAGE_EXTS if e in fields), None)


def iter_shard(path: str, keys: set[str] | None = None) -> Iterator[dict[str, Any]]:
    """Samples of one tar in tar order: ``{"key", "image": PIL RGB, "meta": dict}``.

    Only ``jpg``/``jpeg``/``png`` and ``json`` members are read; others (pickles
    included) are skipped without reading their bytes. A sample without an image
    is skipped with a warning.

    Args:
        path: a ``.tar`` file.
        keys: when given, only samples with these keys are read and decoded.
    """
    for key, fields in _iter_members(path, keys):
        data = image_bytes(fields)
        if data is None:
            log.warning("%s: sample %s has no image member; skipped", path, key)
            continue
        meta = json.loads(fields["json"]) if "json" in fields else {}
        yield {"key": key, "image": decode_image(data, f"{path}:{key}"), "meta": meta}


class ShardBatches(Dataset):
    """Batches of consecutive samples of one tar each, decoded and transformed: what ``embed`` reads.

    Item ``b`` is ``{"key": list[str], "image": (B, 3, S, S)}`` for ``batches[b] = (shard,
    start, stop)``: samples ``start..stop-1`` of ``tars[shard]``, read at the offsets of the
    index (:func:`read_samples`: one ranged request from a URL). Deterministic, so a
    DataLoader over it gives the same tensors with any number of workers.

    Args:
        keys: ``keys[i]`` the ok keys of ``tars[i]`` in tar order; ``spans[i][j]`` = (offset, length).
    """

    def __init__(
        self,
        tars: list[str],
        keys: list[list[str]],
        spans: list[np.ndarray],
        batches: list[tuple[int, int, int]],
        transform: Callable[[Image.Image], torch.Tensor],
    ) -> None:
        self.tars, self.keys, self.spans, self.batches, self.transform = tars, keys, spans, batches, transform

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, b: int) -> dict[str, Any]:
        shard, start, stop = self.batches[b]
        tar, names = self.tars[shard], self.keys[shard]
        picks = range(start, stop)
        images = [
            self.transform(decode_image(data, f"{tar}:{names[j]}"))
            for j, data in zip(picks, read_samples(tar, names, self.spans[shard], picks), strict=True)
        ]
        return {"key": names[start:stop], "image": torch.stack(images)}


# --------------------------------------------------------------------------- transforms


def eval_transform(image_size: int) -> Callable[[Image.Image], torch.Tensor]:
    """Resize the short side to ``image_size``, centre-crop, ImageNet-normalise.

    We keep the whole short side (no 0.875 crop margin) so embeddings see the full frame.

    Shape:
        output: (3, image_size, image_size), float32.
    """
    return T.Compose(
        [
            T.Resize(image_size, interpolation=T.InterpolationMode.BICUBIC, antialias=True),
            T.CenterCrop(image_size),
            T.ToTensor(),
            T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )


def train_transform(cfg: DataConfig) -> Callable[[Image.Image], torch.Tensor]:
    """The MAE recipe's augmentation: RandomResizedCrop(scale=(min_scale, 1)), flip, normalise.

    Shape:
        output: (3, cfg.image_size, cfg.image_size), float32.
    """
    steps: list[Any] = [
        T.RandomResizedCrop(
            cfg.image_size, scale=(cfg.min_scale, 1.0), interpolation=T.InterpolationMode.BICUBIC, antialias=True
        )
    ]
    if cfg.hflip:
        steps.append(T.RandomHorizontalFlip())
    steps += [T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    return T.Compose(steps)


# --------------------------------------------------------------------------- selections


def selection_keys(selection_dir: str | os.PathLike) -> tuple[set[str], list[str]]:
    """What a selection streams: its kept keys and its generated shard directories.

    Returns:
        (keys with ``kept == True`` in the manifest, ``[<selection>/generated]`` when that
        directory exists, else ``[]``).

    Raises:
        ValueError: ``selection_dir`` is not a complete ``dataeff select`` output.
    """
    table, _ = read_selection(selection_dir)
    kept = set(table.loc[table["kept"].astype(bool), "key"].astype(str))
    generated = remote.join(selection_dir, GENERATED_DIR)
    present = (
        remote.is_file(remote.join(generated, INDEX_NAME)) if remote.is_url(generated) else Path(generated).is_dir()
    )
    return kept, ([generated] if present else [])


# --------------------------------------------------------------------------- epoch planning (pure)


def plan_epoch(
    counts: Sequence[int],
    seed: int,
    epoch: int,
    rank: int,
    world_size: int,
    multiple: int = 1,
    shuffle: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """The samples one rank streams in one epoch, as (shard, position-in-shard) pairs.

    All ranks derive the same global order: shards in a permutation seeded by
    ``(seed, epoch)`` (identity when ``shuffle`` is off), each shard's samples in tar
    order. The epoch keeps the largest multiple ``M`` of ``multiple * world_size``
    samples (one *global batch* when ``multiple`` is micro-batch x accumulation) and
    drops the other ``N - M`` (fewer than one global batch): positions drawn by a
    generator seeded with ``(seed, epoch)``, so a different remainder every epoch and
    every sample as likely to be dropped, whatever the shard layout (dropping the tail
    would always drop the same samples when there is a single shard or no shuffling).
    Rank ``r`` then takes the contiguous slice ``[r*M/W, (r+1)*M/W)``, so every rank
    streams exactly ``M / W`` samples, a multiple of ``multiple``: the same batch count
    on every rank (no uneven-shard DDP hang), only full batches, and every sample at
    most once per epoch.

    Args:
        counts: samples per shard (after filtering), in shard-list order.
        multiple: each rank's sample count is a multiple of this (micro-batch x accumulation).

    Returns:
        ``(shard, local)``: int64 arrays of length ``M / W``.

    Raises:
        ValueError: fewer samples than one global batch (``multiple * world_size``).
    """
    sizes = np.asarray(counts, dtype=np.int64)
    total = int(sizes.sum())
    unit = multiple * world_size
    used = total // unit * unit
    if used == 0:
        raise ValueError(
            f"only {total} samples for a global batch of {unit} ({multiple} per rank x {world_size} ranks): "
            "every epoch needs at least one full global batch"
        )
    order = np.random.default_rng([seed, epoch]).permutation(len(sizes)) if shuffle else np.arange(len(sizes))
    ends = np.cumsum(sizes[order])
    keep = np.arange(total, dtype=np.int64)
    if used < total:
        # A stream separate from the shard permutation's, so the permutation is unchanged by it.
        dropped = np.random.default_rng([seed, epoch, 1]).choice(total, total - used, replace=False)
        keep = np.delete(keep, dropped)
    per_rank = used // world_size
    positions = keep[rank * per_rank : (rank + 1) * per_rank]
    slot = np.searchsorted(ends, positions, side="right")
    shard = order[slot]
    local = positions - (ends[slot] - sizes[shard])
    return shard, local


def full_batches(total: int, batch_size: int, world_size: int, accumulate: int = 1) -> int:
    """Full micro-batches every rank streams per epoch of ``total`` samples (a multiple of ``accumulate``).

    Images seen per epoch are then exactly ``full_batches * batch_size * world_size``.
    """
    return total // (batch_size * accumulate * world_size) * accumulate


def shuffle_order(n: int, buffer: int, rng: np.random.Generator) -> np.ndarray:
    """Output order of a streaming shuffle buffer over ``n`` inputs (WebDataset's rule).

    Input ``i`` is only needed once ``buffer`` later inputs have been read, so a
    stream holds at most ``buffer`` undelivered samples.

    Returns:
        a permutation of ``arange(n)``: element k is the input index delivered k-th.
    """
    if buffer <= 1 or n <= 1:
        return np.arange(n)
    held: list[int] = []
    out: list[int] = []
    picks = rng.random(n)
    for i in range(n):
        if len(held) < buffer:
            held.append(i)
            continue
        j = int(picks[i] * len(held))
        out.append(held[j])
        held[j] = i
    out += [held[j] for j in rng.permutation(len(held))]
    return np.asarray(out, dtype=np.int64)


def worker_batches(n_batches: int, start: int, worker: int, num_workers: int) -> range:
    """Batches of a rank's epoch that dataloader ``worker`` produces when resuming at ``start``.

    A ``DataLoader`` asks its workers round-robin from worker 0 and drops exhausted ones,
    so dealing batch ``start + i`` to worker ``i % num_workers`` makes the loader deliver
    batches in plain index order: the sequence never depends on the worker count, and a
    resume at any batch continues it exactly.
    """
    return range(start + worker, n_batches, max(num_workers, 1))


# --------------------------------------------------------------------------- streaming shell


class StreamDataset(IterableDataset):
    """Yields collated batches ``{"image": (B, 3, S, S), "key": list[str]}`` of one rank's epoch plan.

    The rank's stream (``plan_epoch``) is put through a seeded shuffle buffer
    (``shuffle_order``) and cut into full batches (the plan holds a whole number of them, a
    multiple of ``accumulate``, on every rank); batch ``i`` is then a fixed list of stream
    positions, dealt to dataloader workers round-robin (``worker_batches``). A worker
    reads the images its batches need in stream order (at the offsets of the index: one
    seek each from a local tar, one ranged request per run of nearby samples from a URL), keeps them undecoded and decodes + transforms a batch once it is complete. The augmentation
    of a sample is seeded by (seed, epoch, rank, position), so an epoch's batches are the
    same on every run, for any worker count, and after a mid-epoch resume.

    Args:
        tars: shard paths; ``keys[i]`` the kept keys of ``tars[i]`` in tar order.
        spans: ``spans[i][j]`` = (offset, length) of the image of ``keys[i][j]`` in ``tars[i]``.
        num_workers: the DataLoader's worker count.
        accumulate: gradient-accumulation factor: batches per epoch are a multiple of it, so
            no optimiser step straddles an epoch end with a partial accumulation.

    Raises:
        ValueError: the samples cannot fill one global batch (``batch_size * world_size * accumulate``).
    """

    def __init__(
        self,
        tars: list[str],
        keys: list[list[str]],
        spans: list[np.ndarray],
        transform: Callable[[Image.Image], torch.Tensor],
        batch_size: int,
        seed: int,
        rank: int,
        world_size: int,
        num_workers: int,
        shuffle_buffer: int,
        accumulate: int = 1,
    ) -> None:
        super().__init__()
        self.tars, self.keys, self.spans, self.transform = tars, keys, spans, transform
        self.batch_size, self.seed, self.rank, self.world_size = batch_size, seed, rank, world_size
        self.num_workers, self.shuffle_buffer, self.accumulate = num_workers, shuffle_buffer, accumulate
        self.total = sum(len(k) for k in keys)
        n_batches = full_batches(self.total, batch_size, world_size, accumulate)
        if n_batches == 0:
            raise ValueError(
                f"{self.total} samples cannot fill one global batch of {batch_size * world_size * accumulate} "
                f"(batch {batch_size} x {world_size} ranks x accumulation {accumulate}) in {tars[:3]}..."
            )
        self.samples_per_rank = n_batches * batch_size
        self.epoch, self.batches_consumed = 0, 0

    def __len__(self) -> int:
        return self.samples_per_rank // self.batch_size

    def set_position(self, epoch: int, batches_consumed: int = 0) -> None:
        """Start the next iteration at batch ``batches_consumed`` of ``epoch``."""
        if not 0 <= batches_consumed <= len(self):
            raise ValueError(f"batches_consumed={batches_consumed}: must be in [0, {len(self)}]")
        self.epoch, self.batches_consumed = epoch, batches_consumed

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        shard, local = plan_epoch(
            [len(k) for k in self.keys],
            self.seed,
            self.epoch,
            self.rank,
            self.world_size,
            multiple=self.batch_size * self.accumulate,
            shuffle=self.shuffle_buffer > 0,
        )
        rng = np.random.default_rng([self.seed, self.epoch, self.rank])
        order = shuffle_order(len(shard), self.shuffle_buffer, rng)
        size = self.batch_size
        batches = worker_batches(len(self), self.batches_consumed, worker, workers)
        mine = deque(order[b * size : (b + 1) * size] for b in batches)
        if not mine:
            return
        needed = np.zeros(len(shard), dtype=bool)
        needed[np.concatenate(mine)] = True
        pending: dict[int, tuple[str, bytes]] = {}
        for pos, key, data in self._read(shard, local, needed):
            pending[pos] = (key, data)
            while mine and all(int(p) in pending for p in mine[0]):
                samples = [(int(p), *pending.pop(int(p))) for p in mine.popleft()]
                yield {
                    # default_collate stacks straight into shared memory inside a worker, which
                    # saves a copy of every batch on its way to the main process.
                    "image": default_collate([self._sample(data, key, p) for p, key, data in samples]),
                    "key": [key for _, key, _ in samples],
                }
            if not mine:
                return

    def _sample(self, data: bytes, key: str, position: int) -> torch.Tensor:
        image = decode_image(data, key)
        # torchvision draws from the global CPU generator: seed it per sample, then give the
        # caller its state back (matters with num_workers=0). Not torch.manual_seed, which
        # also seeds CUDA lazily and costs ~2 ms per call.
        generator = torch.default_generator
        saved = generator.get_state()
        generator.manual_seed(
            int(np.random.SeedSequence([self.seed, self.epoch, self.rank, position]).generate_state(1)[0])
        )
        try:
            return self.transform(image)
        finally:
            generator.set_state(saved)

    def _read(self, shard: np.ndarray, local: np.ndarray, needed: np.ndarray) -> Iterator[tuple[int, str, bytes]]:
        """``(position, key, image bytes)`` of the needed positions, in tar order (:func:`read_samples`)."""
        breaks = np.flatnonzero((np.diff(shard) != 0) | (np.diff(local) <= 0)) + 1
        for run in np.split(np.arange(len(shard)), breaks):
            run = run[needed[run]]
            if len(run) == 0:
                continue
            t = int(shard[run[0]])
            names = self.keys[t]
            picks = [int(local[p]) for p in run]
            for p, j, data in zip(run, picks, read_samples(self.tars[t], names, self.spans[t], picks), strict=True):
                yield int(p), names[j], data
