"""``dataeff demo-data``: a downstream split and a messy pre-training pool from Kvasir-SEG.

From the vendored ``data/kvasir-seg`` (1,000 colonoscopy images with polyp masks), with
one seed:

- ``<out>/downstream/``: ``n_downstream`` image/mask pairs and ``split.json``
  (``split.json``); the pool never contains these images;
- ``<out>/pool/<centre>/<video>/frame0000.jpg``: the other images as raw frames the
  way archives look — grouped into videos of several centres, with planted
  near-duplicates of some frames next to them (small shift, zoom crop, brightness
  change, lower-quality re-encode), invalid frames (black, over-exposed, blurred),
  truncated files and non-image files named ``.jpg``;
- ``<out>/pool/<centre>/<video>.mp4``: ``n_video_files`` of those videos as real video files
  (MPEG-4 Part 2, every frame resized to the video's first frame; planted frames included),
  so sharding exercises frame extraction; the video's truncated and non-image files stay
  in its folder;
- ``<out>/pool_truth.csv`` (``dataeff-truth/1``): what was planted in each pool file (a
  video frame named ``<video>.mp4#<frame>``), so that a selection's drops can be scored
  (``dataeff select audit.truth=...``).

Frame names say nothing about what was planted. Everything is built under
``<out>/.build`` and renamed into place; ``pool_truth.csv`` comes last and marks the
build complete.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageEnhance, ImageFilter

from dataeff.config import ConfigError, option, to_dict
from dataeff.constants import DEMO_FORMAT, SPLIT_FORMAT, SPLIT_NAME, SUMMARY_NAME, TRUTH_NAME
from dataeff.data.video import require_av
from dataeff.files import save_resolved
from dataeff.lock import locked

__all__ = ["DemoDataConfig", "main", "plan_pool", "split_stems", "NEAR_KINDS", "INVALID_KINDS"]

log = logging.getLogger("dataeff")

NEAR_KINDS = ("shift", "crop", "brightness", "reencode")
INVALID_KINDS = ("black", "overexposed", "blur")
_SOURCE_QUALITY = 88  # the vendored images are JPEG q88; planted frames are saved alike
_NOT_IMAGES = (
    b"<html><head><title>404 Not Found</title></head><body>frame not exported</body></html>\n",
    b'<?xml version="1.0"?>\n<study><series id="3"><frame n="0"/></series></study>\n',
    b"capture log\nframe dropped: buffer overrun\n",
    b'{"device": "endoscope", "error": "no signal"}\n',
    b"\x00" * 512,
)


@dataclass
class DemoDataConfig:
    """Build the demo downstream split and messy pool (``dataeff demo-data``)."""

    src: str = option("data/kvasir-seg", help="Kvasir-SEG copy with images/*.jpg and masks/*.png")
    out: str = option("demo", help="output directory (downstream/, pool/, pool_truth.csv)")
    seed: int = option(0, help="seed of every random choice; same seed -> same bytes")
    n_downstream: int = option(200, help="image/mask pairs held out for fine-tuning (never in the pool)")
    n_val: int = option(30, help="downstream validation pairs (of n_downstream)")
    n_test: int = option(30, help="downstream test pairs (of n_downstream); the rest train")
    n_pool: int = option(0, help="original images in the pool (0 = all not held out)")
    n_near_duplicates: int = option(150, help="planted near-duplicate frames")
    n_invalid: int = option(60, help="planted black / over-exposed / blurred frames")
    n_truncated: int = option(5, help="planted truncated JPEG files")
    n_not_image: int = option(5, help="planted non-image files named .jpg")
    n_centres: int = option(4, help="centre folders of the pool")
    video_length: int = option(20, help="mean original frames per video folder")
    n_video_files: int = option(3, help="videos of the pool written as .mp4 files instead of frame folders")
    overwrite: bool = option(False, help="rebuild an output made with other settings")

    def __post_init__(self) -> None:
        for key in ("n_downstream", "n_centres", "video_length"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{key}={getattr(self, key)}: must be at least 1")
        for key in (
            "n_val", "n_test", "n_pool", "n_near_duplicates", "n_invalid", "n_truncated", "n_not_image", "n_video_files"
        ):  # fmt: skip
            if getattr(self, key) < 0:
                raise ConfigError(f"{key}={getattr(self, key)}: must be >= 0")
        if self.n_val + self.n_test >= self.n_downstream:
            raise ConfigError(
                f"n_val + n_test = {self.n_val + self.n_test} leaves no training pairs of n_downstream={self.n_downstream}"
            )


# --------------------------------------------------------------------------- pure planning


def split_stems(stems: list[str], n_val: int, n_test: int, rng: np.random.Generator) -> dict[str, list[str]]:
    """Seeded train/val/test split of ``stems``; each list sorted."""
    order = [stems[i] for i in rng.permutation(len(stems))]
    test, val, train = order[:n_test], order[n_test : n_test + n_val], order[n_test + n_val :]
    return {"train": sorted(train), "val": sorted(val), "test": sorted(test)}


def plan_pool(originals: list[str], cfg: DemoDataConfig, rng: np.random.Generator) -> list[dict]:
    """Lay the pool out as videos of frames, with planted frames inserted.

    Args:
        originals: source stems of the pool, in the (seeded) order they are filmed.
        cfg: counts of each planted kind.
        rng: the only source of randomness.

    Returns:
        one dict per pool file, in path order: ``path`` (relative to the pool), ``planted``,
        ``kind``, ``stem`` (source image it derives from, "" for non-images), ``twin``
        (path of the copied frame, near-duplicates only), ``param`` (transform strength).
    """
    videos: list[list[dict[str, Any]]] = []
    i = 0
    while i < len(originals):
        length = int(rng.integers(max(1, cfg.video_length // 2), cfg.video_length * 3 // 2 + 1))
        videos.append([{"planted": "none", "kind": "original", "stem": s} for s in originals[i : i + length]])
        i += length
    frames = [(v, f) for v, video in enumerate(videos) for f in range(len(video))]
    # near-duplicates follow their twin in the same video, as consecutive video frames do
    picks = rng.choice(len(frames), size=cfg.n_near_duplicates, replace=cfg.n_near_duplicates > len(frames))
    inserts: dict[tuple[int, int], list[dict]] = {}
    for p in sorted(picks.tolist()):
        v, f = frames[p]
        twin = videos[v][f]
        kind = NEAR_KINDS[int(rng.integers(len(NEAR_KINDS)))]
        inserts.setdefault((v, f), []).append(
            {
                "planted": "near_duplicate",
                "kind": kind,
                "stem": twin["stem"],
                "twin_of": twin,
                "param": float(rng.random()),
            }
        )
    for (v, f), extra in sorted(inserts.items(), reverse=True):
        videos[v][f + 1 : f + 1] = extra
    # invalid frames land anywhere; they derive from a random original's content
    planted = [("invalid", INVALID_KINDS[int(rng.integers(len(INVALID_KINDS)))]) for _ in range(cfg.n_invalid)]
    planted += [("invalid", "truncated")] * cfg.n_truncated + [("invalid", "not_image")] * cfg.n_not_image
    for planted_as, kind in planted:
        v = int(rng.integers(len(videos)))
        stem = "" if kind == "not_image" else originals[int(rng.integers(len(originals)))]
        entry: dict[str, Any] = {"planted": planted_as, "kind": kind, "stem": stem, "param": float(rng.random())}
        videos[v].insert(int(rng.integers(len(videos[v]) + 1)), entry)
    centres = rng.integers(cfg.n_centres, size=len(videos))
    entries: list[dict[str, Any]] = []
    for v, video in enumerate(videos):
        for f, entry in enumerate(video):
            entry["path"] = f"centre{int(centres[v]) + 1}/video{v:03d}/frame{f:04d}.jpg"
            entries.append(entry)
    for entry in entries:
        entry["twin"] = entry.pop("twin_of")["path"] if "twin_of" in entry else ""
        entry.setdefault("param", 0.0)
    return sorted(entries, key=lambda e: e["path"])


def _jpeg(img: Image.Image, quality: int = _SOURCE_QUALITY) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def render(entry: dict, source: bytes) -> bytes:
    """The bytes of one pool file (pure: the entry's kind and ``param`` fix the result).

    Args:
        entry: a :func:`plan_pool` entry.
        source: bytes of the original JPEG it derives from (ignored for ``not_image``).
    """
    kind, p = entry["kind"], entry["param"]
    if kind == "original":
        return source
    if kind == "truncated":
        return source[: int(len(source) * (0.3 + 0.4 * p))]
    if kind == "not_image":
        return _NOT_IMAGES[int(p * len(_NOT_IMAGES)) % len(_NOT_IMAGES)]
    img = Image.open(io.BytesIO(source)).convert("RGB")
    w, h = img.size
    if kind == "shift":  # camera moved a few px: shifted view, black where nothing was seen
        dx, dy = 4 + round(8 * p), -(2 + round(6 * p))
        return _jpeg(img.crop((dx, dy, w + dx, h + dy)))
    if kind == "crop":  # zoomed in by 8-15 %
        frac = 0.85 + 0.07 * p
        cw, ch = round(w * frac), round(h * frac)
        box = ((w - cw) // 2, (h - ch) // 2, (w - cw) // 2 + cw, (h - ch) // 2 + ch)
        return _jpeg(img.crop(box).resize((w, h), Image.Resampling.BICUBIC))
    if kind == "brightness":  # auto-exposure drift: -20..-10 % or +10..+25 %
        factor = 0.8 + 0.2 * p if p < 0.5 else 1.1 + 0.3 * (p - 0.5)
        return _jpeg(ImageEnhance.Brightness(img).enhance(factor))
    if kind == "reencode":  # the same frame exported again at low quality
        return _jpeg(img, quality=35 + int(25 * p))
    if kind == "blur":  # motion/out-of-focus frame
        return _jpeg(img.filter(ImageFilter.GaussianBlur(radius=8 + 6 * p)))
    arr = np.asarray(img, dtype=np.float64)
    if kind == "black":  # lens covered / light off: near-black with sensor noise
        noise = np.random.default_rng(int(p * 2**31)).normal(0.0, 1.5, arr.shape)
        return _jpeg(Image.fromarray(np.clip(arr * 0.03 + 2.0 + noise, 0, 255).astype(np.uint8)))
    if kind == "overexposed":  # light too close: most pixels saturate
        return _jpeg(Image.fromarray(np.clip(arr * 1.3 + 150.0, 0, 255).astype(np.uint8)))
    raise ValueError(f"unknown planted kind {kind!r}")


#: Frames of a frame folder that stay files when the folder becomes a video (no picture to film).
_NOT_FILMED = ("truncated", "not_image")
_VIDEO_RATE = 25


def film_videos(entries: list[dict], n_videos: int, seed: int) -> dict[str, str]:
    """Pick ``n_videos`` frame folders to write as videos; map each filmed frame's path to its name in one.

    The picks come from their own seeded stream, so the rest of the pool (and its planted
    defects) is the same with or without videos.

    Returns:
        pool path of each filmed frame -> ``<folder>.mp4#<frame>`` (frames numbered in path order).
    """
    folders = sorted({e["path"].rsplit("/", 1)[0] for e in entries})
    rng = np.random.default_rng([seed, 1])
    picked = {folders[i] for i in rng.choice(len(folders), size=min(n_videos, len(folders)), replace=False)}
    names: dict[str, str] = {}
    count: dict[str, int] = {}
    for e in entries:  # path order = frame order
        folder = e["path"].rsplit("/", 1)[0]
        if folder in picked and e["kind"] not in _NOT_FILMED:
            names[e["path"]] = f"{folder}.mp4#{count.get(folder, 0)}"
            count[folder] = count.get(folder, 0) + 1
    return names


def _video_of(path: str) -> str:
    """The video (frame folder, or video file without its extension) a pool path belongs to."""
    return path.split("#")[0].removesuffix(".mp4") if "#" in path else path.rsplit("/", 1)[0]


def write_video(path: Path, frames: list[bytes]) -> None:
    """Encode JPEG ``frames`` as an MPEG-4 Part 2 video, each resized to the first frame's (even) size.

    Deterministic: one encoder thread; the encoder's default of no B-frames keeps decode order = frame order.
    """
    av = require_av("set n_video_files=0 for a pool of image files only")
    first = Image.open(io.BytesIO(frames[0]))
    size = (first.width // 2 * 2, first.height // 2 * 2)
    with av.open(str(path), "w", format="mp4") as out:
        stream = out.add_stream("mpeg4", rate=_VIDEO_RATE)
        stream.width, stream.height, stream.pix_fmt = size[0], size[1], "yuv420p"
        stream.thread_count, stream.bit_rate = 1, 4_000_000  # about 8 bits/pixel: near the JPEG frames' quality
        for data in frames:
            img = Image.open(io.BytesIO(data)).convert("RGB").resize(size, Image.Resampling.BICUBIC)
            for packet in stream.encode(av.VideoFrame.from_image(img)):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)


# --------------------------------------------------------------------------- shell


def _source_stems(src: Path) -> list[str]:
    images, masks = src / "images", src / "masks"
    if not images.is_dir() or not masks.is_dir():
        raise ConfigError(f"src={src}: expected images/*.jpg and masks/*.png (the vendored data/kvasir-seg)")
    stems = sorted(p.stem for p in images.glob("*.jpg"))
    missing = [s for s in stems if not (masks / f"{s}.png").is_file()]
    if missing:
        raise ConfigError(f"src={src}: {len(missing)} images have no mask, e.g. masks/{missing[0]}.png")
    return stems


def _build(cfg: DemoDataConfig, src: Path, tmp: Path) -> dict:
    stems = _source_stems(src)
    if cfg.n_downstream >= len(stems):
        raise ConfigError(f"n_downstream={cfg.n_downstream}: {src} has only {len(stems)} images")
    rng = np.random.default_rng(cfg.seed)
    order = [stems[i] for i in rng.permutation(len(stems))]
    held_out, pool_stems = order[: cfg.n_downstream], order[cfg.n_downstream :]
    if cfg.n_pool:
        pool_stems = pool_stems[: cfg.n_pool]
    if not pool_stems:
        raise ConfigError(f"n_downstream={cfg.n_downstream} leaves no images for the pool")

    split: dict[str, Any] = {
        "format": SPLIT_FORMAT,
        "seed": cfg.seed,
        **split_stems(held_out, cfg.n_val, cfg.n_test, rng),
        "groups": None,  # held-out Kvasir-SEG frames carry no video ids
    }
    for sub in ("images", "masks"):
        (tmp / "downstream" / sub).mkdir(parents=True)
    for stem in sorted(held_out):
        shutil.copyfile(src / "images" / f"{stem}.jpg", tmp / "downstream" / "images" / f"{stem}.jpg")
        shutil.copyfile(src / "masks" / f"{stem}.png", tmp / "downstream" / "masks" / f"{stem}.png")
    (tmp / "downstream" / SPLIT_NAME).write_text(json.dumps(split, indent=1) + "\n")

    entries = plan_pool(pool_stems, cfg, rng)
    filmed = film_videos(entries, cfg.n_video_files, cfg.seed)
    cache: dict[str, bytes] = {}
    videos: dict[str, list[bytes]] = {}
    for entry in entries:
        stem = entry["stem"]
        if stem and stem not in cache:
            cache[stem] = (src / "images" / f"{stem}.jpg").read_bytes()
        data = render(entry, cache.get(stem, b""))
        if entry["path"] in filmed:
            videos.setdefault(filmed[entry["path"]].split("#")[0], []).append(data)
            continue
        dest = tmp / "pool" / entry["path"]
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(data)
    for name, frames in sorted(videos.items()):
        (tmp / "pool" / name).parent.mkdir(parents=True, exist_ok=True)
        write_video(tmp / "pool" / name, frames)
    for entry in entries:
        entry["path"], entry["twin"] = (
            filmed.get(entry["path"], entry["path"]),
            filmed.get(entry["twin"], entry["twin"]),
        )
    with open(tmp / TRUTH_NAME, "w", newline="") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(["source", "planted", "kind", "twin"])
        writer.writerows([e["path"], e["planted"], e["kind"], e["twin"]] for e in entries)

    counts: dict[str, int] = {}
    for e in entries:
        counts[e["kind"]] = counts.get(e["kind"], 0) + 1
    return {
        "format": DEMO_FORMAT,
        "downstream": {k: len(split[k]) for k in ("train", "val", "test")},
        "pool_files": len(entries) - len(filmed) + len(videos),
        "pool_frames": len(entries),
        "video_files": sorted(videos),
        "pool_sources": sorted({e["stem"] for e in entries if e["stem"]}),
        "pool_kinds": dict(sorted(counts.items())),
        "centres": sorted({e["path"].split("/")[0] for e in entries}),
        "videos": len({_video_of(e["path"]) for e in entries}),
        "config": {k: v for k, v in to_dict(cfg).items() if k not in ("out", "overwrite")},
    }


@locked("demo-data")
def main(cfg: DemoDataConfig) -> dict:
    """Build (or find already built) the demo data in ``cfg.out``; print and return a summary."""
    src, out = Path(cfg.src), Path(cfg.out)
    summary_path = out / SUMMARY_NAME
    settings = {k: v for k, v in to_dict(cfg).items() if k not in ("out", "overwrite")}
    if (out / TRUTH_NAME).is_file() and summary_path.is_file():
        done = json.loads(summary_path.read_text())
        if done.get("config") == settings:
            log.info("demo-data: %s is already built; skipping", out)
            _print(done, out)
            return done
        if not cfg.overwrite:
            raise ConfigError(
                f"out={cfg.out} holds demo data built with other settings; set overwrite=true or choose another out"
            )
    save_resolved(cfg, out)
    # a killed or replaced build leaves pieces behind: start clean
    for name in (".build", "downstream", "pool"):
        shutil.rmtree(out / name, ignore_errors=True)
    for name in (TRUTH_NAME, SUMMARY_NAME):
        (out / name).unlink(missing_ok=True)
    tmp = out / ".build"
    summary = _build(cfg, src, tmp)
    (tmp / SUMMARY_NAME).write_text(json.dumps(summary, indent=1) + "\n")
    for name in ("downstream", "pool", SUMMARY_NAME, TRUTH_NAME):  # the truth CSV marks completion
        os.replace(tmp / name, out / name)
    tmp.rmdir()
    _print(summary, out)
    return summary


def _print(summary: dict, out: Path) -> None:
    d = summary["downstream"]
    kinds = ", ".join(f"{k} {n}" for k, n in summary["pool_kinds"].items())
    print(
        f"demo data in {out}:\n"
        f"  downstream: {sum(d.values())} image/mask pairs (train {d['train']}, val {d['val']}, test {d['test']})\n"
        f"  pool: {summary['pool_frames']} frames in {summary['pool_files']} files from "
        f"{len(summary['pool_sources'])} source images in {len(summary['centres'])} centres, {summary['videos']} "
        f"videos ({len(summary['video_files'])} as video files)\n"
        f"  planted: {kinds}\n"
        f"  truth: {out / TRUTH_NAME}"
    )
