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


def small_jpeg(path: Path, size: int) -> bytes:
    """JPEG bytes of the image at ``path`` shrunk so its long side is ``size`` px (quality 90)."""
    with Image.open(path) as img:
        img = img.convert("RGB")
        scale = size / max(img.size)
        img = img.resize(
            (max(1, round(img.width * scale)), max(1, round(img.height * scale))), Image.Resampling.BICUBIC
        )
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


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
