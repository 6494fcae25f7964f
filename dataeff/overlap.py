"""``dataeff overlap``: find downstream images that are (near-)copies of pre-training pool samples.

Public polyp sets are subsets of each other and hospital pools hold the same videos as
downstream sets, so a selection method could "win" by keeping test images. This stage
compares every image of every downstream dataset with the pool (signals and thresholds:
:mod:`dataeff.overlap_core`, docs/overlap.md) and writes, into ``out``:

- ``matches.parquet`` / ``matches.csv``: one row per matched (pool key, downstream file);
- ``files.parquet``: every downstream file with its status (``ok``, ``unreadable`` or
  ``skipped``) and reason, so no image goes unaccounted for;
- ``overlap.png``: each matched pair side by side with its kind and similarities;
- ``summary.json`` (written last): counts per dataset and kind, thresholds, inputs.

The pool's pixel hashes, pHashes and thumbnails are not computed here: the shard stage
stored them in ``index.parquet`` (``dataeff-shards/3``), so no pass decodes the pool.

The sweep runs this stage once and passes its directory to every select
(``select.exclude``), which drops the matched pool keys for every method with reason
:data:`DOWNSTREAM_OVERLAP`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from omegaconf import DictConfig, OmegaConf
from PIL import Image, ImageDraw
from timm.models.vision_transformer import VisionTransformer

from dataeff import overlap_core as core
from dataeff.config import ConfigError, EncoderConfig, option
from dataeff.constants import CONFIG_NAME, OVERLAP_FORMAT, SHARDS_FORMAT, SIGNATURE_KEYS, SUMMARY_NAME
from dataeff.data import remote
from dataeff.data import signatures as sig
from dataeff.data.decode import read_rgb
from dataeff.data.downstream import LAYOUTS, SUPPORTED_EXTS, detect_layout
from dataeff.data.stream import eval_transform, list_shards, read_index, shard_keys
from dataeff.files import file_sha256, save_resolved, write_atomic, write_json_atomic
from dataeff.lock import locked
from dataeff.models.encoder import build_encoder
from dataeff.select.embed import embed_batch, load_embeddings, read_header, shard_set_hash
from dataeff.select.gallery import load_images

log = logging.getLogger("dataeff")

#: Selection reason of a pool sample dropped because it overlaps a downstream image.
MATCHES_NAME = "matches.parquet"
FILES_NAME = "files.parquet"
SHEET_NAME = "overlap.png"


@dataclass
class OverlapConfig:
    """Compare downstream datasets with the pre-training pool (``dataeff overlap``)."""

    embeddings: str = option("", help="embeddings directory of the pool ('dataeff embed' output, required)")
    datasets: dict = option({}, help="downstream datasets: datasets.<name>=<root> (images/ + masks/ or CVC layout)")
    out: str = option("", help="output directory (required)")
    pool: str = option("", help="pool shard dir(s); empty = the shards recorded in the embeddings header")
    layout: str = option("auto", help="downstream folder layout: auto, kvasir, cvc or generic")
    signals: list = option(list(core.KINDS), help="signals to use: any of exact, phash, embedding")
    phash_max_distance: int = option(sig.PHASH_MAX_DISTANCE, help="pHash candidate: Hamming distance <= this (of 64)")
    min_thumb_corr: float = option(sig.MIN_THUMB_CORR, help="pHash confirmation: thumbnail correlation >= this")
    min_cosine: float = option(core.MIN_COSINE, help="embedding match: cosine similarity >= this")
    device: str = option("auto", help="device embedding the downstream images: auto, cpu or cuda")
    batch_size: int = option(64, help="downstream images per forward pass")
    sheet_pairs: int = option(48, help="at most this many matched pairs drawn in overlap.png")

    def __post_init__(self) -> None:
        if not self.embeddings:
            raise ConfigError("embeddings is required: embeddings=<'dataeff embed' output of the pool>")
        if not self.out:
            raise ConfigError("out is required: out=<directory for matches.parquet, summary.json, overlap.png>")
        if not self.datasets:
            raise ConfigError(
                "no downstream datasets: set datasets.<name>=<root>, e.g. datasets.kvasir=data/kvasir-seg"
            )
        if self.layout != "auto" and self.layout not in LAYOUTS:
            raise ConfigError(f"layout={self.layout!r}: choose auto, {', '.join(LAYOUTS)}")
        bad = sorted(set(self.signals) - set(core.KINDS))
        if bad or not self.signals:
            raise ConfigError(f"signals={list(self.signals)}: give a non-empty subset of {list(core.KINDS)}")
        if not 0 <= self.phash_max_distance <= 64:
            raise ConfigError(f"phash_max_distance={self.phash_max_distance}: must be in 0..64")
        if not -1.0 <= self.min_thumb_corr <= 1.0 or not -1.0 <= self.min_cosine <= 1.0:
            raise ConfigError("min_thumb_corr and min_cosine must be in [-1, 1]")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"device={self.device!r}: choose auto, cpu or cuda")
        if self.batch_size < 1 or self.sheet_pairs < 0:
            raise ConfigError("batch_size must be >= 1 and sheet_pairs >= 0")


# --------------------------------------------------------------------------- signatures


def image_signatures(images: Sequence[Image.Image]) -> dict[str, np.ndarray]:
    """Pixel sha256, packed pHash and thumbnail of each image (as the shard stage computes them).

    Shape:
        -> pixel_sha (N,) str, phash (N,) uint64, thumbs (N, S, S) uint8.
    """
    rows = [sig.image_signature(im) for im in images]
    sha, phash, thumbs, _ = sig.index_signatures(
        [r["pixel_sha256"] for r in rows], [r["phash"] for r in rows], [r["thumb"] for r in rows]
    )
    return {"pixel_sha": sha, "phash": phash, "thumbs": thumbs}


def pool_signatures(index: pd.DataFrame, keys: np.ndarray) -> dict[str, np.ndarray]:
    """Signatures of the pool samples ``keys``, read from their shard index rows.

    A sample whose row has no signature (null thumbnail: a generated sample) matches
    nothing by pixel hash or pHash; the embedding signal still sees it.

    Raises:
        ConfigError: an index predates the signature columns (``dataeff-shards/3``); the
            message names its shard directory and says to re-shard.

    Shape:
        index: rows with ``key`` and ``shard_dir``; keys (N,) -> pixel_sha (N,) str,
        phash (N,) uint64, thumbs (N, S, S) uint8 (see :func:`signatures.index_signatures`).
    """
    if not set(SIGNATURE_KEYS) <= set(index.columns):
        where = sorted(set(index["shard_dir"]))
        raise ConfigError(
            f"pool={', '.join(where)}: index.parquet has no image signatures ({', '.join(SIGNATURE_KEYS)}), "
            f"it was written before {SHARDS_FORMAT}; re-shard the raw images with 'dataeff shard ... "
            "overwrite=true' (and re-embed), then rerun overlap"
        )
    rows = index.set_index("key").reindex(keys)
    sha, phash, thumbs, _ = sig.index_signatures(
        rows["pixel_sha256"].where(rows["pixel_sha256"].notna(), None).tolist(),
        rows["phash"].fillna(0).astype(np.int64).tolist(),
        rows["thumb"].where(rows["thumb"].notna(), None).tolist(),
    )
    return {"keys": np.asarray(keys, dtype=str), "pixel_sha": sha, "phash": phash, "thumbs": thumbs}


def scan_dataset(
    name: str, root: str, layout: str, embed: Callable[[list[Image.Image]], np.ndarray], batch: int
) -> tuple[pd.DataFrame, dict[str, np.ndarray]]:
    """Every file of a dataset's image folder, read and checked: one row each, none dropped.

    Images are decoded, signed and embedded ``batch`` at a time, so memory does not grow
    with the dataset.

    Returns:
        the file table (``dataset, file, status (ok/unreadable/skipped), reason,
        byte_sha256, pixel_sha256, width, height``) and the signatures of its ``ok``
        rows, in table order (:func:`image_signatures` plus ``emb`` (K, D) float16).
    """
    root_path = Path(root)
    layout = detect_layout(root_path) if layout == "auto" else layout
    image_dir = root_path / LAYOUTS[layout][0]
    if not image_dir.is_dir():
        raise ConfigError(f"datasets.{name}={root}: no {LAYOUTS[layout][0]}/ folder ({layout} layout)")
    rows: list[dict[str, Any]] = []
    parts: list[dict[str, np.ndarray]] = []
    pending: list[Image.Image] = []

    def flush() -> None:
        if pending:
            parts.append({**image_signatures(pending), "emb": embed(pending)})
            pending.clear()

    for path in sorted(p for p in image_dir.rglob("*") if p.is_file()):
        row: dict[str, Any] = {"dataset": name, "file": path.relative_to(root_path).as_posix(), "status": "ok"}
        row.update(reason="", byte_sha256="", pixel_sha256="", width=0, height=0)
        rows.append(row)
        if path.suffix.lower() not in SUPPORTED_EXTS:
            row.update(status="skipped", reason=f"unsupported_extension:{path.suffix.lower() or 'none'}")
            continue
        try:
            row["byte_sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
            image = read_rgb(path)
        except Exception as exc:  # PIL raises many types for corrupt data
            row.update(status="unreadable", reason=f"{exc.__class__.__name__}: {exc}")
            continue
        row.update(width=image.width, height=image.height)
        pending.append(image)
        if len(pending) == batch:
            flush()
    flush()
    if not rows:
        raise ConfigError(f"datasets.{name}={root}: {image_dir} holds no files")
    table = pd.DataFrame(rows)
    sigs = {k: np.concatenate([p[k] for p in parts]) for k in ("pixel_sha", "phash", "thumbs", "emb")} if parts else {}
    if sigs:
        table.loc[table["status"] == "ok", "pixel_sha256"] = sigs["pixel_sha"]
    return table, sigs


def _listing_hash(root: str) -> str:
    """sha256 of (relative path, size, mtime) of every file under ``root``: a changed dataset reruns."""
    entries = [
        (p.relative_to(root).as_posix(), p.stat().st_size, p.stat().st_mtime_ns)
        for p in sorted(Path(root).rglob("*"))
        if p.is_file()
    ]
    return hashlib.sha256(json.dumps(entries).encode()).hexdigest()


# --------------------------------------------------------------------------- encoder


def _encoder_of(emb_dir: str, header: dict) -> tuple[VisionTransformer, int, str]:
    """Rebuild the encoder that wrote the pool embeddings (weights checked by sha256)."""
    enc = header["encoder"]
    known = {f.name for f in dataclasses.fields(EncoderConfig)}  # pooling comes from header["pool"]
    cfg = EncoderConfig(**{k: v for k, v in enc["config"].items() if k in known})
    if cfg.weights:
        if not Path(cfg.weights).is_file() or file_sha256(cfg.weights) != enc["sha256"]:
            raise ConfigError(
                f"embeddings={emb_dir}: encoder weights {cfg.weights} are missing or changed since the pool was "
                "embedded; downstream embeddings would not be comparable; re-embed the pool or restore the weights"
            )
        with torch.random.fork_rng(devices=[]):
            return build_encoder(cfg).eval(), header["image_size"], header["pool"]
    resolved = Path(emb_dir) / CONFIG_NAME
    saved = OmegaConf.load(resolved) if resolved.is_file() else None
    seed = saved.get("seed") if isinstance(saved, DictConfig) else None
    if seed is None or enc["sha256"] != f"random-init(seed={seed})":
        raise ConfigError(f"embeddings={emb_dir}: random-init encoder without a matching {CONFIG_NAME} seed")
    log.warning("overlap: the pool encoder is randomly initialised; the embedding signal is noise (tests only)")
    with torch.random.fork_rng(devices=[]):  # the caller's RNG stream stays untouched
        torch.manual_seed(int(seed))  # same draw order as 'dataeff embed': same weights
        return build_encoder(cfg).eval(), header["image_size"], header["pool"]


def image_embedder(
    model: VisionTransformer, image_size: int, pool: str, device: str
) -> Callable[[list[Image.Image]], np.ndarray]:
    """A function embedding images exactly as 'dataeff embed' does (eval transform, pooling,
    L2 normalisation) but in fp32; a pool embedded under bf16 autocast puts an identical
    image slightly below cosine 1, so ``min_cosine`` must stay well below 1.

    Shape:
        images: K PIL images -> (K, D) float16.
    """
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device=cuda but no CUDA device is visible; use device=auto or cpu")
    dev = torch.device("cuda" if use_cuda else "cpu")
    model = model.to(dev)
    transform = eval_transform(image_size)

    def embed(images: list[Image.Image]) -> np.ndarray:
        return embed_batch(model, torch.stack([transform(im) for im in images]).to(dev), pool, None)

    return embed


# --------------------------------------------------------------------------- contact sheet


def contact_sheet(
    pairs: Sequence[tuple[Image.Image | None, Image.Image | None, str]], title: str, side: int = 128
) -> Image.Image:
    """Downstream image | pool image | caption, one matched pair per row.

    Written here rather than with the gallery's tiles: those carry an 18-character caption
    under each tile, and a pair needs one long caption beside both images.
    """
    width, line = 2 * side + 420, side + 6
    sheet = Image.new("RGB", (width, 22 + max(len(pairs), 1) * line), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    draw.text((4, 4), title, fill=(0, 0, 0))
    for r, (down, pool, caption) in enumerate(pairs):
        y = 22 + r * line
        for c, img in enumerate((down, pool)):
            if img is not None:
                scale = side / max(img.size)
                size = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
                sheet.paste(img.resize(size, Image.Resampling.BICUBIC), (c * side, y))
        for k, text in enumerate(caption.split("\n")):
            draw.text((2 * side + 8, y + 4 + 14 * k), text, fill=(0, 0, 0))
    return sheet


def _draw_sheet(out: Path, matches: pd.DataFrame, roots: dict[str, str], index: pd.DataFrame, n: int) -> None:
    shown = matches.assign(_rank=matches["kind"].map(core.KINDS.index)).sort_values(["_rank", "dataset", "file"])
    shown = shown.head(n)
    pool_images = load_images(set(shown["pool_key"]), index) if len(shown) else {}
    pairs = [
        (
            read_rgb(Path(roots[r.dataset]) / r.file),
            pool_images.get(r.pool_key),
            f"{r.kind} ({r.signals})\n{r.dataset}/{r.file}\npool {r.pool_key}\n"
            f"phash d={r.phash_distance}  thumb r={r.thumb_corr:.3f}  cos={r.cosine:.4f}",
        )
        for r in shown.itertuples()
    ]
    title = f"downstream (left) vs pool (right): {len(shown)} of {len(matches)} matched pairs"
    sheet = contact_sheet(pairs, title)
    write_atomic(out / SHEET_NAME, lambda tmp: sheet.save(tmp, format="PNG"))


# --------------------------------------------------------------------------- stage


def _inputs(cfg: OverlapConfig, header: dict, set_hash: str) -> dict[str, Any]:
    return {
        "embeddings": os.path.abspath(cfg.embeddings),
        "encoder_sha256": header["encoder"]["sha256"],
        "shard_set_hash": set_hash,
        "datasets": {
            n: {"root": os.path.abspath(r), "listing": _listing_hash(r)} for n, r in sorted(cfg.datasets.items())
        },
        "layout": cfg.layout,
        "signals": sorted(cfg.signals),
        "thresholds": {
            "phash_max_distance": cfg.phash_max_distance,
            "min_thumb_corr": cfg.min_thumb_corr,
            "min_cosine": cfg.min_cosine,
        },
    }


@locked("overlap")
def main(cfg: OverlapConfig) -> dict[str, Any]:
    """Match every downstream image against the pool and write the outputs (skips when done).

    Returns:
        the summary (also ``<out>/summary.json``).
    """
    out = Path(cfg.out)
    # The cheapest input check first: a mistyped dataset root fails without reading the pool.
    for name, root in cfg.datasets.items():
        if not Path(root).is_dir():
            raise ConfigError(f"datasets.{name}={root}: no such directory; give the downstream dataset folder")
    header = read_header(cfg.embeddings)
    spec = cfg.pool or header["shards"]
    try:
        tars = list_shards(spec)
    except ValueError as exc:
        raise ConfigError(f"pool={spec}: {exc}") from None
    keys_per_shard = shard_keys(tars)
    set_hash = shard_set_hash(tars, keys_per_shard)
    if set_hash != header["shard_set_hash"]:
        raise ConfigError(
            f"pool={spec} is not the shard set embedded in embeddings={cfg.embeddings}; give the right pool"
        )
    inputs = _inputs(cfg, header, set_hash)
    if (out / SUMMARY_NAME).is_file():
        old = json.loads((out / SUMMARY_NAME).read_text())
        if old.get("inputs") == inputs:
            log.info("overlap already computed in %s with the same inputs; nothing to do", out)
            return old
    save_resolved(cfg, out)

    index = pd.concat([read_index(d).assign(shard_dir=str(d)) for d in sorted({remote.parent(t) for t in tars})])
    index = index[index["status"] == "ok"]
    pool = pool_signatures(index, np.asarray([k for keys in keys_per_shard for k in keys], dtype=str))
    emb_keys, emb = load_embeddings(cfg.embeddings, dtype=np.float16)
    rows = pd.Index(emb_keys).get_indexer(pool["keys"])
    if (rows < 0).any():
        raise ConfigError(
            f"embeddings={cfg.embeddings} lacks {int((rows < 0).sum())} pool samples; re-run 'dataeff embed'"
        )
    pool_emb = emb[rows]
    model, image_size, pooling = _encoder_of(cfg.embeddings, header)
    embed = image_embedder(model, image_size, pooling, cfg.device)
    tables, parts = [], []
    for name, root in sorted(cfg.datasets.items()):
        table, sigs = scan_dataset(name, root, cfg.layout, embed, cfg.batch_size)
        tables.append(table)
        parts += [sigs] if sigs else []
    files = pd.concat(tables, ignore_index=True)
    ok = files[files["status"] == "ok"].reset_index(drop=True)
    size = sig.THUMB_SIZE
    empty = {
        "pixel_sha": np.zeros(0, str),
        "phash": np.zeros(0, np.uint64),
        "thumbs": np.zeros((0, size, size), np.uint8),
        "emb": np.zeros((0, header["dim"]), np.float16),
    }
    query = {k: np.concatenate([p[k] for p in parts]) if parts else v for k, v in empty.items()}
    byte_sha = index.set_index("key")["sha256"].reindex(pool["keys"]).fillna("").astype(str).to_numpy()

    found: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    if "exact" in cfg.signals:
        pix = core.exact_pairs(list(pool["pixel_sha"]), list(query["pixel_sha"]))
        byt = core.exact_pairs(list(byte_sha), list(ok["byte_sha256"]))
        found["exact"] = (np.concatenate([pix[0], byt[0]]), np.concatenate([pix[1], byt[1]]))
    if "phash" in cfg.signals:
        i, j, _ = core.confirmed_phash_pairs(
            pool["phash"], query["phash"], pool["thumbs"], query["thumbs"], cfg.phash_max_distance, cfg.min_thumb_corr
        )
        found["phash"] = (i, j)
    if "embedding" in cfg.signals:
        i, j, _ = core.cosine_pairs(pool_emb, query["emb"], cfg.min_cosine)
        found["embedding"] = (i, j)
    matches = core.match_table(
        pool["keys"], ok["dataset"], ok["file"], found, pool["phash"], query["phash"],
        pool_emb, query["emb"], pool["thumbs"], query["thumbs"],
    )  # fmt: skip

    matched = set(zip(matches["dataset"], matches["file"], strict=True))
    files["matched"] = [(d, f) in matched for d, f in zip(files["dataset"], files["file"], strict=True)]
    table = files
    write_atomic(out / MATCHES_NAME, lambda tmp: matches.to_parquet(tmp, index=False))
    write_atomic(out / "matches.csv", lambda tmp: matches.to_csv(tmp, index=False))
    write_atomic(out / FILES_NAME, lambda tmp: table.to_parquet(tmp, index=False))
    _draw_sheet(out, matches, cfg.datasets, index, cfg.sheet_pairs)

    null = {}
    for name in sorted(cfg.datasets):
        sel = (ok["dataset"] == name).to_numpy()
        nn = core.nearest_other_cosine(query["emb"][sel], query["pixel_sha"][sel])
        nn = nn[np.isfinite(nn)]
        null[name] = {q: float(np.quantile(nn, float(q))) for q in ("0.5", "0.99", "1.0")} if len(nn) else {}
        if null[name] and null[name]["0.99"] >= cfg.min_cosine and "embedding" in cfg.signals:
            log.warning(
                "overlap: in %s, 1%% of images have a *different* image with cosine >= %.4f >= min_cosine; "
                "the embedding signal will flag neighbours, raise min_cosine",
                name,
                null[name]["0.99"],
            )
    summary = {
        "format": OVERLAP_FORMAT,
        "inputs": inputs,
        "pool": {"shards": spec, "samples": int(len(pool["keys"]))},
        "counts": core.summarise(matches, sorted(cfg.datasets)),
        "files": {
            n: {
                s: int(((table["dataset"] == n) & (table["status"] == s)).sum())
                for s in ("ok", "unreadable", "skipped")
            }
            for n in sorted(cfg.datasets)
        },
        "not_compared": table.loc[table["status"] != "ok", ["dataset", "file", "status", "reason"]].to_dict("records"),
        "excluded_pool_keys": len(core.excluded_keys(matches)),
        "null_nearest_cosine": null,
        "outputs": [MATCHES_NAME, "matches.csv", FILES_NAME, SHEET_NAME],
    }
    write_json_atomic(out / SUMMARY_NAME, summary, indent=2)
    log.info(
        "overlap: %d matched pairs, %d pool samples to exclude -> %s", len(matches), summary["excluded_pool_keys"], out
    )
    return summary
