"""Streaming from object storage: the same shards from local disk and from a loopback S3 server.

Both readers are ``PretrainDataModule`` with the same config (decode, MAE train transform,
collate, DataLoader workers); only ``data.shards`` differs: a local directory or its
upload to ``s3://`` on a moto S3 server on 127.0.0.1 (its own process, so serving does
not share this process's interpreter). The remote reader fetches each run of nearby
samples with one ranged request; the table gives the requests it made per sample
(from the server's request log). Target: remote >= 80% of local samples/s.

Run: ``python benchmarks/bench_remote.py [--images 1024] [--workers 2] [--epochs 3]``.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_stream import build_raw, interleaved  # noqa: E402

from dataeff.config import DataConfig  # noqa: E402
from dataeff.data.datamodules import PretrainDataModule  # noqa: E402
from dataeff.data.shard import ShardConfig  # noqa: E402
from dataeff.data.shard import main as shard_main  # noqa: E402


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_s3(log_path: Path) -> tuple[subprocess.Popen, str]:
    """``moto_server`` on a free loopback port, logging requests to ``log_path``."""
    port = free_port()
    log = open(log_path, "w")  # noqa: SIM115 (closed with the process)
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], stdout=log, stderr=log
    )
    endpoint = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            urllib.request.urlopen(endpoint + "/moto-api/", timeout=1).close()
            return proc, endpoint
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("moto server did not start")


def upload(local: Path, url: str) -> None:
    import s3fs

    fs = s3fs.S3FileSystem()
    bucket = url.removeprefix("s3://").split("/")[0]
    fs.mkdir(bucket)
    for path in sorted(local.iterdir()):
        if path.is_file():
            fs.put_file(str(path), f"{url.removeprefix('s3://')}/{path.name}")


def tar_gets(log_path: Path) -> int:
    """GET requests of tar objects in the server's request log (colour codes removed)."""
    lines = re.sub(r"\x1b\[[0-9;]*m", "", log_path.read_text()).splitlines()
    return sum(1 for line in lines if '"GET ' in line and ".tar " in line)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1024)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--samples-per-shard", type=int, default=256)
    parser.add_argument("--epochs", type=int, default=3, help="timed rounds (best epoch per reader is kept)")
    args = parser.parse_args()
    torch.set_num_threads(1)

    with tempfile.TemporaryDirectory() as tmp:
        raw = build_raw(Path(tmp) / "raw", args.images)
        shards = Path(tmp) / "shards" / "bench"
        shard_main(
            ShardConfig(
                src=str(raw),
                out=str(shards),
                samples_per_shard=args.samples_per_shard,
                workers=args.workers,
                progress=False,
            )
        )
        log_path = Path(tmp) / "s3.log"
        server, endpoint = start_s3(log_path)
        os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1")
        os.environ["AWS_ENDPOINT_URL"] = endpoint
        try:
            url = "s3://bench/shards/bench"
            upload(shards, url)
            loaders = {}
            for name, spec in (("local disk", str(shards)), ("S3 (loopback moto server)", url)):
                cfg = DataConfig(
                    shards=spec,
                    image_size=args.image_size,
                    batch_size=args.batch_size,
                    num_workers=args.workers,
                    shuffle_buffer=256,
                )
                dm = PretrainDataModule(cfg, seed=0, rank=0, world_size=1)
                loaders[name] = dm.train_dataloader()
            before = tar_gets(log_path)
            rounds = args.epochs + 1  # interleaved() runs one warm-up epoch per reader first
            results = interleaved({k: (lambda loader=v: iter(loader)) for k, v in loaders.items()}, args.epochs)
            requests = tar_gets(log_path) - before
        finally:
            server.terminate()
            server.wait(timeout=30)

    local, s3 = results.values()
    streamed = dm.samples_per_rank
    print(
        f"\n{args.images} images ({streamed} streamed per epoch) in {args.images // args.samples_per_shard} tars, "
        f"{args.image_size} px, batch {args.batch_size}, {args.workers} workers, best of {args.epochs} "
        "interleaved epochs\n"
    )
    print("| source | samples/s | vs local | ranged requests per sample |")
    print("|---|---:|---:|---:|")
    print(f"| local disk | {local:.1f} | 1.00x | – |")
    print(f"| S3 (loopback) | {s3:.1f} | {s3 / local:.2f}x | {requests / (rounds * streamed):.3f} |")
    print(f"\ntarget: S3 >= 80% of local samples/s ({100 * s3 / local:.0f}%)")


if __name__ == "__main__":
    main()
