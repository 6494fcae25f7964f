"""Streaming throughput: PretrainDataModule vs an ImageFolder reader vs the decode limit.

All three do the same per-sample work (decode JPEG, MAE train transform, collate) with
the same number of DataLoader workers and batch size:

- ``PretrainDataModule``: shards written by ``dataeff shard`` from the raw tree;
- ``ImageFolder``: ``torchvision.datasets.ImageFolder`` over the raw tree (one file per
  sample, random access, the usual baseline);
- ``decode limit``: a map-style dataset over the image bytes already in memory (no
  file system, no tar parsing): the physical limit of decode + transform.

Run: ``python benchmarks/bench_stream.py [--images 512] [--workers 2] [--epochs 2]``.
"""

from __future__ import annotations

import argparse
import io
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision.datasets import ImageFolder

from dataeff.config import DataConfig
from dataeff.data.datamodules import PretrainDataModule
from dataeff.data.shard import ShardConfig
from dataeff.data.shard import main as shard_main
from dataeff.data.stream import train_transform

REPO = Path(__file__).resolve().parents[1]


def build_raw(root: Path, n: int) -> Path:
    """``n`` real Kvasir-SEG JPEGs (cycled when ``n`` exceeds them) as ``root/site{k}/...``."""
    sources = sorted((REPO / "data" / "kvasir-seg" / "images").glob("*.jpg"))
    for k in range(n):
        dest = root / f"site{k % 2}" / f"{k:06d}.jpg"
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(sources[k % len(sources)].read_bytes() if k < len(sources) else _variant(sources, k))
    return root


def _variant(sources: list[Path], k: int) -> bytes:
    # Beyond the real set, flip a copy so the shard stage does not drop exact duplicates.
    image = Image.open(sources[k % len(sources)]).convert("RGB").rotate(90 * (k // len(sources) % 4), expand=True)
    buf = io.BytesIO()
    image.transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(buf, "JPEG", quality=95)
    return buf.getvalue()


class InMemory(Dataset):
    def __init__(self, blobs: list[bytes], transform) -> None:
        self.blobs, self.transform = blobs, transform

    def __len__(self) -> int:
        return len(self.blobs)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.transform(Image.open(io.BytesIO(self.blobs[i])).convert("RGB"))


def epoch_rate(make_iter) -> float:
    """Samples/s of one full epoch, worker start-up included."""
    start, seen = time.perf_counter(), 0
    for batch in make_iter():
        seen += len(batch["image"] if isinstance(batch, dict) else batch)
    return seen / (time.perf_counter() - start)


def interleaved(readers: dict, epochs: int) -> dict[str, float]:
    """Best epoch rate per reader over ``epochs`` rounds, the readers taking turns each round.

    One warm-up epoch each first (page cache). Taking turns and keeping the best round
    makes the comparison fair on a machine shared with other jobs.
    """
    for make_iter in readers.values():
        epoch_rate(make_iter)
    best = dict.fromkeys(readers, 0.0)
    for _ in range(epochs):
        for name, make_iter in readers.items():
            best[name] = max(best[name], epoch_rate(make_iter))
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--epochs", type=int, default=3, help="timed rounds (best epoch per reader is kept)")
    args = parser.parse_args()
    torch.set_num_threads(1)

    with tempfile.TemporaryDirectory() as tmp:
        raw = build_raw(Path(tmp) / "raw", args.images)
        shards = Path(tmp) / "shards" / "bench"
        shard_main(
            ShardConfig(src=str(raw), out=str(shards), samples_per_shard=128, workers=args.workers, progress=False)
        )
        cfg = DataConfig(
            shards=str(shards),
            image_size=args.image_size,
            batch_size=args.batch_size,
            num_workers=args.workers,
            shuffle_buffer=256,
        )
        transform = train_transform(cfg)
        dm = PretrainDataModule(cfg, seed=0, rank=0, world_size=1)
        loader = dm.train_dataloader()
        folder = DataLoader(
            ImageFolder(str(raw), transform=transform),
            batch_size=args.batch_size,
            shuffle=True,
            num_workers=args.workers,
        )
        blobs = [p.read_bytes() for p in sorted(raw.rglob("*.jpg"))]
        memory = DataLoader(
            InMemory(blobs, transform), batch_size=args.batch_size, shuffle=True, num_workers=args.workers
        )

        results = interleaved(
            {
                "PretrainDataModule (shards)": lambda: iter(loader),
                "ImageFolder (raw files)": lambda: (b for b, _ in folder),
                "decode limit (bytes in memory)": lambda: iter(memory),
            },
            args.epochs,
        )

    ours, base, limit = (results[k] for k in results)
    print(
        f"\n{args.images} images ({dm.samples_per_rank} streamed), {args.image_size} px, batch "
        f"{args.batch_size}, {args.workers} workers, best of {args.epochs} interleaved epochs\n"
    )
    print("| reader | samples/s | vs ImageFolder | vs decode limit |")
    print("|---|---:|---:|---:|")
    for name, value in results.items():
        print(f"| {name} | {value:.1f} | {value / base:.2f}x | {100 * value / limit:.0f}% |")
    print(f"\ntargets: >= 1x ImageFolder ({ours / base:.2f}x), >= 70% of decode limit ({100 * ours / limit:.0f}%)")


if __name__ == "__main__":
    main()
