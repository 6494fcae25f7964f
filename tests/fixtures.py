"""Shared test fixtures: small raw image trees and shard directories built from real images.

Images are the first ``n`` Kvasir-SEG images (sorted by name) of the vendored copy in
``data/kvasir-seg``, downscaled so their long side is ``size`` px, so fixtures are
tiny, deterministic and still look like colonoscopy frames.

Usage::

    from tests.fixtures import make_raw_tree, make_shards
    raw = make_raw_tree(tmp_path / "raw", n=24, size=48)          # raw/site{i}/...
    shards = make_shards(tmp_path, n=24, samples_per_shard=8)     # dir with index.parquet
"""

from __future__ import annotations

import io
import tarfile
from pathlib import Path
from typing import Any

from PIL import Image

REPO = Path(__file__).resolve().parents[1]
KVASIR = REPO / "data" / "kvasir-seg"


def kvasir_images(n: int) -> list[Path]:
    """The first ``n`` Kvasir-SEG image paths, sorted by name."""
    paths = sorted((KVASIR / "images").glob("*.jpg"))
    if len(paths) < n:
        raise FileNotFoundError(f"need {n} images in {KVASIR / 'images'}, found {len(paths)}")
    return paths[:n]


def png_bytes(img: Image.Image) -> bytes:
    """``img`` encoded as PNG."""
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def jpeg_bytes(img: Image.Image, quality: int = 90) -> bytes:
    """``img`` encoded as JPEG."""
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def small_jpeg(path: Path, size: int) -> bytes:
    """JPEG bytes of the image at ``path`` shrunk so its long side is ``size`` px (quality 90)."""
    with Image.open(path) as img:
        img = img.convert("RGB")
        scale = size / max(img.size)
        img = img.resize(
            (max(1, round(img.width * scale)), max(1, round(img.height * scale))), Image.Resampling.BICUBIC
        )
    return jpeg_bytes(img)


def shard_tree(src: Path, out: Path, **overrides: Any) -> dict:
    """``dataeff shard`` of ``src`` into ``out`` (one worker, 8 samples per tar); returns its summary."""
    from dataeff.data.shard import ShardConfig, main

    settings: dict[str, Any] = {"workers": 1, "progress": False, "min_side": 16, "samples_per_shard": 8}
    settings.update(overrides)
    return main(ShardConfig(src=str(src), out=str(out), **settings))


def tar_samples(out: Path) -> dict[str, dict[str, bytes]]:
    """key -> extension -> member bytes, over every tar of the shard directory ``out``."""
    samples: dict[str, dict[str, bytes]] = {}
    for tar_path in sorted(Path(out).glob("*.tar")):
        with tarfile.open(tar_path) as tar:
            for m in tar.getmembers():
                key, ext = m.name.split(".", 1)
                member = tar.extractfile(m)
                assert member is not None, m.name
                samples.setdefault(key, {})[ext] = member.read()
    return samples


def tiny_encoder_config(img_size: int = 32) -> Any:
    """A randomly initialised 2-block, 64-wide ViT (patch 8) for tests."""
    from dataeff.config import EncoderConfig

    return EncoderConfig(
        name="vit_tiny_patch16_224",
        img_size=img_size,
        patch_size=8,
        depth=2,
        embed_dim=64,
        num_heads=2,
        allow_random_init=True,
    )


def write_selection(sel: Path, keys: list[str], kept: set[str]) -> Path:
    """A complete selection directory keeping ``kept`` of the pool ``keys``."""
    import pandas as pd

    from dataeff.constants import SELECTION_FORMAT
    from dataeff.select.manifest import write_selection as write_selection_dir

    sel.mkdir(parents=True, exist_ok=True)
    table = pd.DataFrame(
        {
            "key": keys,
            "kept": [k in kept for k in keys],
            "reason": "kept",
            "cluster": -1,
            "score": 0.0,
            "generated": False,
        }
    )
    write_selection_dir(sel, table, {"format": SELECTION_FORMAT})
    return sel


def make_raw_tree(root: Path, n: int = 24, size: int = 48, sites: int = 2) -> Path:
    """Write ``n`` real images as a raw tree ``root/site{i}/vid{j}/<stem>.jpg`` and return ``root``.

    Image ``k`` goes to site ``k % sites`` and video ``k // (sites * 4)``, so each site
    has a few "videos" of consecutive frames. Same arguments -> same bytes.
    """
    root = Path(root)
    for k, path in enumerate(kvasir_images(n)):
        dest = root / f"site{k % sites}" / f"vid{k // (sites * 4)}" / f"{path.stem}.jpg"
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(small_jpeg(path, size))
    return root


def make_shards(tmp_path: Path, n: int = 24, size: int = 48, samples_per_shard: int = 8, **overrides: Any) -> Path:
    """Build a raw tree of ``n`` images and shard it; return the shard dir (with index.parquet).

    The raw tree goes to ``tmp_path/raw`` and the shards to ``tmp_path/shards/demo``
    (files ``demo-000000.tar``, ...). ``overrides`` are ``ShardConfig`` fields
    (e.g. ``workers=2``, ``max_side=32``, ``min_side=8``).
    """
    from dataeff.data.shard import ShardConfig, main

    raw = make_raw_tree(Path(tmp_path) / "raw", n=n, size=size)
    out = Path(tmp_path) / "shards" / "demo"
    settings: dict[str, Any] = {"workers": 1, "progress": False, "min_side": 8}
    settings.update(overrides)
    main(ShardConfig(src=str(raw), out=str(out), samples_per_shard=samples_per_shard, **settings))
    return out


def make_embedded_pool(tmp_path: Path) -> dict[str, Path]:
    """Tiny shards (:func:`make_shards`) embedded by ``configs/embed/tiny.yaml`` in one process.

    Returns ``{"tmp", "shards", "embeddings"}``.
    """
    from dataeff.cli import main as cli_main

    shards = make_shards(tmp_path, n=24, size=48, samples_per_shard=8)
    emb = Path(tmp_path) / "embeddings"
    assert cli_main(["embed", "--config", "configs/embed/tiny.yaml", f"data.shards={shards}", f"out={emb}"]) == 0
    return {"tmp": Path(tmp_path), "shards": shards, "embeddings": emb}
