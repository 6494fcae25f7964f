"""``dataeff embed``: every rank embeds its own shards with a ViT; float16 unit vectors out.

Shard i goes to rank i % world_size. Its samples are read in batches of
``data.batch_size`` consecutive samples (one ranged request each from a URL), decoded
and transformed by ``data.num_workers`` DataLoader workers and embedded in order in the
main process, so the output is byte-identical for any worker count. Each finished shard is written to
``parts/<i>_<name>.npz`` (resume skips it), then each rank merges its parts into
``rank-%05d.npz`` and rank 0 writes ``header.json`` last: its presence means the
directory is complete (format ``dataeff-embeddings/1``, docs/architecture.md).
The pure core is :func:`embed_batch`; :func:`load_embeddings` reads the result back,
sorted by key, whatever the number of ranks that wrote it.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import multiprocessing
import os
import shutil
import time
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer
from torch.utils.data import DataLoader
from tqdm import tqdm

from dataeff import dist, provenance
from dataeff.config import ConfigError, EncoderConfig, first_line, option, section, to_dict
from dataeff.constants import EMBEDDINGS_FORMAT, EMBEDDINGS_HEADER
from dataeff.data import remote
from dataeff.data.stream import ShardBatches, eval_transform, list_shards, shard_samples
from dataeff.encoder_check import check_encoder
from dataeff.files import file_sha256, save_resolved, write_atomic, write_json_atomic
from dataeff.lock import locked
from dataeff.models.encoder import build_encoder, pooled_features

log = logging.getLogger("dataeff")

Pool = Literal["cls", "mean"]
Device = Literal["auto", "cpu", "cuda"]
Precision = Literal["auto", "fp32", "bf16", "fp16"]


@dataclass
class EmbedDataConfig:
    """The shard set to embed (embedding reads every ok sample in order: no crops, no shuffling)."""

    shards: str = option(
        "", help="shard directory (with index.parquet), several joined by ',', or a brace pattern; local or a URL"
    )
    batch_size: int = option(64, help="images per forward pass per rank")
    num_workers: int = option(2, help="DataLoader worker processes per rank reading and decoding images (0 = main)")

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ConfigError(f"data.batch_size={self.batch_size}: must be at least 1")
        if self.num_workers < 0:
            raise ConfigError(f"data.num_workers={self.num_workers}: must be >= 0")


@dataclass
class EmbedEncoderConfig(EncoderConfig):
    """The embedding ViT, plus how its tokens are pooled into one vector per image."""

    pool: Pool = option("cls", help="embedding pooling: 'cls' token or 'mean' of patch tokens")


@dataclass
class EmbedConfig:
    """Embed every ok sample of a shard set."""

    data: EmbedDataConfig = section(EmbedDataConfig, help="data.shards (input), data.batch_size (images per forward)")
    encoder: EmbedEncoderConfig = section(EmbedEncoderConfig, help="the ViT; encoder=<path> sets encoder.weights")
    out: str = option("", help="embeddings directory to write")
    device: Device = option("auto", help="'auto' (cuda:<local rank> when available, else cpu), 'cpu' or 'cuda'")
    precision: Precision = option(
        "auto", help="'auto' = bf16 autocast on GPU (fp16 without bf16), fp32 on CPU; or fp32/bf16/fp16"
    )
    seed: int = option(
        0, help="torch seed before building the encoder (a random-init encoder is then identical on all ranks)"
    )
    progress_bar: bool = option(True, help="show a progress bar (rank 0) with images/s")
    overwrite: bool = option(
        False, help="replace an out holding embeddings (or parts) of another encoder, pool or settings"
    )

    def __post_init__(self) -> None:
        if not self.out:
            raise ConfigError("out is empty: set out=<embeddings dir>")
        if not self.data.shards:
            raise ConfigError("data.shards is empty: set data.shards=<shard dir written by 'dataeff shard'>")
        if remote.is_url(self.out):
            raise ConfigError(f"out={self.out}: embed writes to a local (or shared) directory, not a URL")


# --------------------------------------------------------------------------- pure core


def embed_batch(model: VisionTransformer, images: torch.Tensor, pool: str, amp: torch.dtype | None) -> np.ndarray:
    """L2-normalised pooled features of a batch, as float16.

    Normalisation happens in float32, after autocast, so rows are unit length up to
    float16 rounding.

    Shape:
        images: (B, 3, S, S) on the model's device -> (B, D) float16.
    """
    ctx = torch.autocast(images.device.type, dtype=amp) if amp is not None else nullcontext()
    with torch.inference_mode(), ctx:
        feats = pooled_features(model, images, pool)
    return F.normalize(feats.float(), dim=1).cpu().numpy().astype(np.float16)


def owned_shards(n_shards: int, rank: int, world_size: int) -> list[int]:
    """Shard ids rank ``rank`` embeds: i % world_size == rank."""
    return list(range(rank, n_shards, world_size))


def shard_set_hash(tars: list[str], keys: list[list[str]]) -> str:
    """sha256 over (tar name, ok keys) of every shard, in order: same shards -> same hash."""
    payload = json.dumps([[remote.basename(t), k] for t, k in zip(tars, keys, strict=False)])
    return hashlib.sha256(payload.encode()).hexdigest()


def shard_batches(counts: list[int], shards: list[int], size: int) -> list[tuple[int, int, int]]:
    """``(shard, start, stop)`` of every batch: each shard's samples cut into ``size`` consecutive ones.

    A shard's last batch may be smaller; batches never span two shards, so a shard's part
    file is complete after its last batch, and the batches are the same for any worker count.
    """
    return [(i, a, min(a + size, counts[i])) for i in shards for a in range(0, counts[i], size)]


# --------------------------------------------------------------------------- files


def _save_npz(path: Path, keys: np.ndarray, emb: np.ndarray, **extra: np.ndarray) -> None:
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as fh:  # a file object: np.savez would append .npz to a name
            np.savez(fh, keys=np.asarray(keys, dtype=str), embeddings=emb.astype(np.float16), **extra)  # type: ignore[arg-type]

    write_atomic(path, write)


@contextmanager
def _npy_member(path: str | os.PathLike, name: str, block_size: int) -> Iterator[tuple[IO[bytes], tuple, bool, Any]]:
    """One array of an ``.npz`` (a path or URL), opened past its header: (stream, shape, Fortran order, dtype)."""
    with (
        remote.open_stream(str(path), block_size=block_size) as raw,
        zipfile.ZipFile(raw) as zf,
        zf.open(name + ".npy") as fh,
    ):
        version = np.lib.format.read_magic(fh)
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read(fh)
        yield fh, tuple(shape), fortran, dtype


def npz_shape(path: str | os.PathLike, name: str = "embeddings") -> tuple[int, ...]:
    """Shape of one array in an ``.npz`` (a path or URL) without loading it."""
    with _npy_member(path, name, 2**16) as (_, shape, _, _):
        return shape


def read_npz_rows(path: str | os.PathLike, out: np.ndarray, name: str = "embeddings") -> int:
    """Read one 2-D array of an ``.npz`` (a path or URL) into the first rows of ``out``,
    converting its dtype, :data:`_READ_BYTES` at a time: never a second copy of the whole
    array. Returns its number of rows.

    Raises:
        ValueError: the array has more rows than ``out`` or other columns, or is stored in Fortran order.
    """
    with _npy_member(path, name, 2**20) as (fh, shape, fortran, dtype):
        if len(shape) != out.ndim or shape[0] > len(out) or shape[1:] != out.shape[1:] or fortran:
            raise ValueError(f"{name} has shape {shape}{' (Fortran order)' if fortran else ''}, not {out.shape}")
        count = shape[0]
        step = max(1, _READ_BYTES // max(1, dtype.itemsize * int(np.prod(shape[1:]))))
        for at in range(0, count, step):
            rows = out[at : min(at + step, count)]
            data = fh.read(dtype.itemsize * rows.size)
            if len(data) != dtype.itemsize * rows.size:
                raise ValueError(f"{name} ends after {at} of {count} rows")
            rows[...] = np.frombuffer(data, dtype=dtype).reshape(rows.shape)
    return count


#: Bytes read at a time by :func:`read_npz_rows`.
_READ_BYTES = 1 << 26


def damaged_file(emb_dir: str | os.PathLike, name: str, exc: BaseException) -> ConfigError:
    """The error for a file of an embeddings directory that cannot be read."""
    return ConfigError(f"embeddings={emb_dir}: {name} is damaged ({first_line(exc)}); re-embed into a fresh directory")


def read_header(emb_dir: str | os.PathLike) -> dict:
    """``header.json`` of a complete embeddings directory, with its files checked.

    Raises:
        ConfigError: no header (not embedded or not finished), a missing rank file, or
            rank files whose embedding dimensions differ from each other or the header.
    """
    path = remote.join(emb_dir, EMBEDDINGS_HEADER)
    if not remote.is_file(path):
        raise ConfigError(f"embeddings={emb_dir}: no {EMBEDDINGS_HEADER}; run 'dataeff embed' (to completion) first")
    try:
        header = json.loads(remote.read_text(path))
        files, dim = list(header["files"]), header["dim"]
    except (ValueError, KeyError, TypeError) as exc:
        raise damaged_file(emb_dir, EMBEDDINGS_HEADER, exc) from None
    for name in files:
        f = remote.join(emb_dir, name)
        if not remote.is_file(f):
            raise ConfigError(f"embeddings={emb_dir}: {name} is missing; re-run 'dataeff embed'")
        try:
            shape = npz_shape(f)
        except (OSError, ValueError, KeyError, zipfile.BadZipFile) as exc:
            raise damaged_file(emb_dir, name, exc) from None
        if len(shape) != 2 or shape[1] != dim:
            raise ConfigError(
                f"embeddings={emb_dir}: {name} holds vectors of shape {shape}, the header says dim {dim}; "
                "mismatched embedding dimensions (files from different encoders?) — re-embed into a fresh directory"
            )
    return header


def load_embeddings(
    emb_dir: str | os.PathLike, files: list[str] | None = None, dtype: type = np.float32
) -> tuple[np.ndarray, np.ndarray]:
    """Keys and embeddings of (some of) the rank files of a directory or URL, sorted by key.

    Shape:
        -> keys (N,) str, embeddings (N, D) ``dtype``.
    """
    header = read_header(emb_dir)
    files = header["files"] if files is None else files
    keys, embs = [np.zeros(0, dtype=str)], [np.zeros((0, header["dim"]), dtype=np.float16)]
    for name in files:
        path = remote.join(emb_dir, name)
        try:
            source = io.BytesIO(remote.read_bytes(path)) if remote.is_url(path) else path
            with np.load(source, allow_pickle=False) as z:
                keys.append(z["keys"])
                embs.append(z["embeddings"])
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:
            raise damaged_file(emb_dir, name, exc) from None
    k, e = np.concatenate(keys), np.concatenate(embs)
    order = np.argsort(k, kind="stable")
    return k[order], e[order].astype(dtype, copy=False)


# --------------------------------------------------------------------------- stage


def _part_path(out: Path, tars: list[str], i: int) -> Path:
    return out / "parts" / f"{i:06d}_{remote.basename(tars[i]).removesuffix('.tar')}.npz"


def _loader(batches: ShardBatches, num_workers: int) -> DataLoader:
    """Batches in order; ``num_workers`` forked processes read and decode ahead of the forward passes."""
    fork = "fork" if num_workers > 0 and "fork" in multiprocessing.get_all_start_methods() else None
    return DataLoader(batches, batch_size=None, shuffle=False, num_workers=num_workers, multiprocessing_context=fork)


def _device_and_amp(cfg: EmbedConfig, local_rank: int) -> tuple[torch.device, torch.dtype | None]:
    use_cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device=cuda but no CUDA device is visible; use device=auto or cpu")
    device = torch.device(f"cuda:{local_rank % max(torch.cuda.device_count(), 1)}" if use_cuda else "cpu")
    if cfg.precision == "fp32" or (cfg.precision == "auto" and not use_cuda):
        return device, None
    if cfg.precision == "fp16" or (cfg.precision == "auto" and not torch.cuda.is_bf16_supported()):
        return device, torch.float16
    return device, torch.bfloat16


#: What an embeddings directory holds (removed by ``overwrite=true``).
_OUTPUTS = ("parts", "rank-*.npz", EMBEDDINGS_HEADER)


@locked("embed", collective=True)
def main(cfg: EmbedConfig) -> dict[str, Any]:
    """Embed this rank's shards (resumably), merge them, and (rank 0) write the header.

    Returns:
        This rank's numbers, for a caller that logs them (the sweep's W&B ``embed`` run):
        ``count`` (pool samples), ``embedded`` (images this rank embedded in this call; 0
        when the embeddings were complete), ``wall_s`` and ``images_per_s`` (this rank),
        ``world_size``.
    """
    env = dist.init()
    rank, world = dist.rank(), dist.world_size()
    out = Path(cfg.out)
    try:
        tars = list_shards(cfg.data.shards)
        samples = shard_samples(tars)
    except ConfigError:
        raise
    except ValueError as exc:
        raise ConfigError(
            f"data.shards={cfg.data.shards}: {exc}; set data.shards to a directory written by 'dataeff shard'"
        ) from None
    keys_per_shard = [list(frame["key"]) for frame in samples]
    total = sum(len(k) for k in keys_per_shard)
    if total == 0:
        raise ConfigError(f"data.shards={cfg.data.shards}: empty shard set (no ok samples in the index)")
    # Refuses missing weights (unless allow_random_init), an unknown or non-ViT name and a bad
    # shape here, before config.yaml is written.
    enc = check_encoder(cfg.encoder, "encoder")
    set_hash = shard_set_hash(tars, keys_per_shard)
    pool_id = provenance.pool_identity(cfg.data.shards)
    weights_id = file_sha256(enc.weights) if enc.weights else "random-init"
    inputs = {"data.shards": pool_id, "encoder.weights": weights_id}
    rec = provenance.record("embed", provenance.config_values(to_dict(cfg), inputs), inputs)
    provenance.settle(
        out,
        rec,
        cfg.overwrite,
        clear=lambda: provenance.remove(out, _OUTPUTS),
        has_output=lambda: provenance.holds_any(out, _OUTPUTS),
    )
    identity = {"encoder": {"name": enc.name, "weights": enc.weights}, "shard_set_hash": set_hash}
    if (out / EMBEDDINGS_HEADER).is_file():
        old = json.loads((out / EMBEDDINGS_HEADER).read_text())
        if {
            "encoder": {k: old["encoder"][k] for k in ("name", "weights")},
            "shard_set_hash": old["shard_set_hash"],
        } != identity:
            raise ConfigError(
                f"out={out} holds embeddings of another encoder or shard set; choose a fresh out directory"
            )
        if rank == 0:  # killed between writing the header and this cleanup
            shutil.rmtree(out / "parts", ignore_errors=True)
        log.info("embeddings already complete in %s; nothing to do", out)
        return {"count": total, "embedded": 0, "wall_s": 0.0, "images_per_s": 0.0, "world_size": world}
    if rank == 0:
        save_resolved(cfg, out)
    (out / "parts").mkdir(parents=True, exist_ok=True)

    torch.manual_seed(cfg.seed)  # same random-init weights on every rank
    device, amp = _device_and_amp(cfg, env.local_rank)
    model = build_encoder(cfg.encoder).eval().to(device)
    transform = eval_transform(enc.img_size)
    mine = owned_shards(len(tars), rank, world)
    bar = tqdm(
        total=sum(len(keys_per_shard[i]) for i in mine),
        unit="img",
        desc=f"embed rank {rank}",
        disable=rank != 0 or not cfg.progress_bar,
    )
    start, done = time.time(), 0
    todo = []
    for i in mine:
        part = _part_path(out, tars, i)
        if part.is_file():
            with np.load(part, allow_pickle=False) as z:
                if str(z["tar"]) == tars[i] and list(z["keys"]) == keys_per_shard[i]:
                    bar.update(len(keys_per_shard[i]))
                    continue
        todo.append(i)
    batches = shard_batches([len(k) for k in keys_per_shard], todo, cfg.data.batch_size)
    spans = [frame[["offset", "length"]].to_numpy(np.int64) for frame in samples]
    loader = _loader(ShardBatches(tars, keys_per_shard, spans, batches, transform), cfg.data.num_workers)
    parts: dict[int, list[np.ndarray]] = {i: [] for i in todo}
    for i in todo:
        if not keys_per_shard[i]:  # a shard without ok samples: its part is empty
            _save_npz(
                _part_path(out, tars, i), np.zeros(0, dtype=str), np.zeros((0, 0), np.float16), tar=np.array(tars[i])
            )
    for (i, first, stop), batch in zip(batches, loader, strict=True):
        assert batch["key"] == keys_per_shard[i][first:stop], "batches arrive in order"
        parts[i].append(embed_batch(model, batch["image"].to(device, non_blocking=True), cfg.encoder.pool, amp))
        bar.update(stop - first)
        done += stop - first
        if stop == len(keys_per_shard[i]):
            emb = np.concatenate(parts.pop(i))
            _save_npz(_part_path(out, tars, i), np.array(keys_per_shard[i], dtype=str), emb, tar=np.array(tars[i]))
    bar.close()
    if done:
        log.info(
            "rank %d embedded %d images in %.1fs (%.1f images/s)",
            rank,
            done,
            time.time() - start,
            done / max(time.time() - start, 1e-9),
        )
    wall = time.time() - start
    _finish(out, tars, mine, rank, world, cfg, enc, {"shard_set_hash": set_hash, "pool_id": pool_id}, total)
    return {
        "count": total,
        "embedded": done,
        "wall_s": round(wall, 3),
        "images_per_s": done / max(wall, 1e-9) if done else 0.0,
        "world_size": world,
    }


def _finish(
    out: Path,
    tars: list[str],
    mine: list[int],
    rank: int,
    world: int,
    cfg: EmbedConfig,
    enc: EncoderConfig,
    pool: dict[str, str],
    total: int,
) -> None:
    keys, embs = [np.zeros(0, dtype=str)], []
    for i in mine:
        with np.load(_part_path(out, tars, i), allow_pickle=False) as z:
            if len(z["keys"]):
                keys.append(z["keys"])
                embs.append(z["embeddings"])
    dims = dist.all_gather_object(int(embs[0].shape[1]) if embs else -1)
    dim = max(dims)
    _save_npz(
        out / f"rank-{rank:05d}.npz",
        np.concatenate(keys),
        np.concatenate(embs) if embs else np.zeros((0, dim), np.float16),
    )
    counts = dist.all_gather_object(int(sum(len(k) for k in keys)))
    dist.barrier()
    if rank == 0:
        if sum(counts) != total:
            raise RuntimeError(f"embedded {sum(counts)} samples, the index lists {total}")
        files = [f"rank-{r:05d}.npz" for r in range(world)]
        for stale in out.glob("rank-*.npz"):  # left by an earlier run with more ranks
            if stale.name not in files:
                stale.unlink()
        header = {
            "format": EMBEDDINGS_FORMAT,
            "encoder": {
                "name": enc.name,
                "weights": enc.weights,
                "sha256": file_sha256(enc.weights) if enc.weights else f"random-init(seed={cfg.seed})",
                "config": to_dict(enc),
            },
            "image_size": enc.img_size,
            "pool": cfg.encoder.pool,
            "dim": dim,
            "count": total,
            "shards": cfg.data.shards,
            **pool,
            "world_size": world,
            "files": files,
        }
        write_json_atomic(out / EMBEDDINGS_HEADER, header, indent=2)
        shutil.rmtree(out / "parts", ignore_errors=True)
    dist.barrier()
