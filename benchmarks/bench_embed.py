"""Embedding throughput with 0, 1 and 2 DataLoader workers decoding (``embed data.num_workers``).

``dataeff embed`` on the same shards with each worker count: images/s over the whole
stage (encoder build and worker start-up included), and the check that every run wrote
byte-identical embeddings. With 0 workers the main process decodes and runs the ViT in
turn; with workers, decoding overlaps the forward passes. The baseline is the 0-worker run.

Run: ``python benchmarks/bench_embed.py [--images 512] [--image-size 224] [--depth 4]``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_stream import build_raw  # noqa: E402

from dataeff.config import load_config  # noqa: E402
from dataeff.data.shard import ShardConfig  # noqa: E402
from dataeff.data.shard import main as shard_main  # noqa: E402
from dataeff.select import embed  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--depth", type=int, default=4, help="ViT blocks (width 192, patch 16)")
    parser.add_argument("--rounds", type=int, default=2, help="timed rounds (best per worker count is kept)")
    args = parser.parse_args()
    threads = torch.get_num_threads()

    with tempfile.TemporaryDirectory() as tmp:
        raw = build_raw(Path(tmp) / "raw", args.images)
        shards = Path(tmp) / "shards" / "bench"
        shard_main(ShardConfig(src=str(raw), out=str(shards), samples_per_shard=128, workers=2, progress=False))
        best = dict.fromkeys(args.workers, 0.0)
        outputs = {}
        for r in range(args.rounds):
            for workers in args.workers:
                out = Path(tmp) / f"emb-{workers}-{r}"
                cfg = load_config(
                    embed.EmbedConfig,
                    None,
                    [
                        f"data.shards={shards}",
                        f"out={out}",
                        f"data.batch_size={args.batch_size}",
                        f"data.num_workers={workers}",
                        "encoder.name=vit_tiny_patch16_224",
                        f"encoder.img_size={args.image_size}",
                        f"encoder.depth={args.depth}",
                        "encoder.allow_random_init=true",
                        "device=cpu",
                        "precision=fp32",
                        "progress_bar=false",
                    ],
                )
                torch.set_num_threads(threads)  # the main process keeps every thread for the forward
                start = time.perf_counter()
                embed.main(cfg)
                best[workers] = max(best[workers], args.images / (time.perf_counter() - start))
                with np.load(out / "rank-00000.npz", allow_pickle=False) as z:
                    outputs[workers] = (z["keys"].tobytes(), z["embeddings"].tobytes())

    identical = len(set(outputs.values())) == 1
    base = best[args.workers[0]]
    print(
        f"\n{args.images} images, ViT depth {args.depth} width 192 at {args.image_size} px, batch "
        f"{args.batch_size}, {threads} torch threads, best of {args.rounds} rounds\n"
    )
    print(f"| data.num_workers | images/s | vs {args.workers[0]} workers |")
    print("|---:|---:|---:|")
    for workers, value in best.items():
        print(f"| {workers} | {value:.1f} | {value / base:.2f}x |")
    print(f"\nembeddings byte-identical across worker counts: {identical}")


if __name__ == "__main__":
    main()
