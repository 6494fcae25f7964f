"""Whole-pipeline soak: shard -> embed -> select (MedDEL, random) -> pretrain at growing N.

Per N: ``N`` small real-codec images (64-px JPEGs of varied, deterministic content:
gradients, shapes, noise) are generated, then every stage runs as its own
``python -m dataeff`` process with the tiny configs (``configs/*/tiny.yaml``; embedding
and pre-training use a tiny random-init ViT; pre-training runs a fixed ``--steps``).
Printed per stage and N: wall time, images/s, the stage process's peak RSS, output size,
and the growth exponent of time and of peak RSS against the previous N
(log(t2/t1) / log(N2/N1): 1 = linear). The baseline is the previous N, side by side.

    python benchmarks/bench_scale.py                     # N = 1,000 and 10,000
    python benchmarks/bench_scale.py --max-n 1000000     # 1k, 10k, 100k, 1M
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

REPO = Path(__file__).resolve().parents[1]


def image(i: int, size: int, seed: int) -> Image.Image:
    """One deterministic image: a colour gradient, a few filled shapes, sensor-like noise."""
    rng = np.random.default_rng([seed, i])
    yy, xx = np.mgrid[0:size, 0:size] / size
    a, b = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    w = (np.cos(rng.uniform(0, np.pi)) * xx + np.sin(rng.uniform(0, np.pi)) * yy)[..., None]
    base = a * (1 - w) + b * w + rng.normal(0, 12, (size, size, 3))
    img = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(1, 5))):
        x0, y0 = rng.integers(0, size - 8, 2)
        x1, y1 = x0 + rng.integers(6, size // 2), y0 + rng.integers(6, size // 2)
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)((int(x0), int(y0), int(x1), int(y1)), fill=colour)
    return img


def generate(root: Path, n: int, size: int, seed: int) -> Path:
    """``n`` JPEGs (q85) under ``root/site{i % 4}/vid{i // 100}/``; kept when already complete."""
    done = root / ".complete"
    if done.is_file():
        return root
    shutil.rmtree(root, ignore_errors=True)
    for i in range(n):
        dest = root / f"site{i % 4}" / f"vid{i // 100:05d}" / f"f{i:07d}.jpg"
        dest.parent.mkdir(parents=True, exist_ok=True)
        image(i, size, seed).save(dest, quality=85)
    done.write_text(str(n))
    return root


def run_stage(args: list[str], log: Path) -> tuple[float, float]:
    """Wall seconds and peak RSS (GiB) of one ``python -m dataeff`` process."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    t = time.time()
    with open(log, "w") as fh:
        proc = subprocess.Popen([sys.executable, "-m", "dataeff", *args], stdout=fh, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
    wall = time.time() - t
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"stage {' '.join(args[:1])} failed; see {log}")
    return wall, usage.ru_maxrss / 2**20


def size_mib(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**20


def pipeline(n: int, out: Path, args: argparse.Namespace) -> dict[str, tuple[float, float, float]]:
    """stage -> (wall s, peak RSS GiB, output MiB) for one N."""
    raw = generate(args.cache / f"raw-{n}", n, args.size, args.seed)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    cfg = REPO / "configs"
    stages = {
        "shard": (
            [
                "shard",
                "--config",
                f"{cfg}/shard/tiny.yaml",
                f"src={raw}",
                f"out={out}/shards",
                "samples_per_shard=1000",
            ],
            out / "shards",
        ),
        "embed": (
            [
                "embed",
                "--config",
                f"{cfg}/embed/tiny.yaml",
                f"data.shards={out}/shards",
                f"out={out}/emb",
                "data.batch_size=256",
            ],
            out / "emb",
        ),
    }
    for method in ("meddel", "random"):
        stages[f"select {method}"] = (
            ["select", "--config", f"{cfg}/select/tiny.yaml", f"embeddings={out}/emb", f"out={out}/{method}"]
            + [f"method={method}", f"ratio={args.ratio}"],
            out / method,
        )
    stages["pretrain"] = (
        ["pretrain", "--config", f"{cfg}/pretrain/tiny.yaml", f"data.shards={out}/shards"]
        + [f"data.selection={out}/meddel", f"out={out}/pretrain", f"trainer.max_steps={args.steps}"],
        out / "pretrain",
    )
    result = {}
    for name, (cli, dest) in stages.items():
        wall, rss = run_stage(cli, out / f"{name.replace(' ', '-')}.log")
        result[name] = (wall, rss, size_mib(dest))
        print(f"<!-- N={n} {name}: {wall:.1f} s -->", flush=True)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--max-n", type=int, default=10_000, help="largest N; sizes are 1,000 x 10^i up to it")
    ap.add_argument("--size", type=int, default=64, help="image side, px")
    ap.add_argument("--ratio", type=float, default=0.05)
    ap.add_argument("--steps", type=int, default=20, help="pre-training steps (fixed for every N)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("bench-out/scale"))
    args = ap.parse_args()
    args.cache = args.out / "raw"
    sizes = [1000 * 10**i for i in range(int(math.log10(args.max_n / 1000)) + 1)]

    print(
        f"\n## pipeline soak, {args.size}-px JPEGs, tiny configs, ratio {args.ratio}, {args.steps} pre-training steps\n"
    )
    print("| stage | N | wall s | images/s | peak RSS GiB | output MiB | time exponent | RSS exponent |")
    print("|---|---|---|---|---|---|---|---|")
    prev: dict[str, tuple[int, float, float]] = {}
    for n in sizes:
        for stage, (wall, rss, mib) in pipeline(n, args.out / f"n{n}", args).items():
            grow = ("–", "–")
            if stage in prev:
                n0, w0, r0 = prev[stage]
                grow = tuple(f"{math.log(b / a) / math.log(n / n0):.2f}" for a, b in ((w0, wall), (r0, rss)))
            prev[stage] = (n, wall, rss)
            rate = f"{args.steps * 8 / wall:.0f} (steps x batch)" if stage == "pretrain" else f"{n / wall:.0f}"
            print(
                f"| {stage} | {n:,} | {wall:.1f} | {rate} | {rss:.2f} | {mib:.1f} | {grow[0]} | {grow[1]} |", flush=True
            )
    print("\nexponents compare each N with the previous one; 1.0 = linear")


if __name__ == "__main__":
    main()
