"""Benchmark of MedDEL selection past one rank's memory: ``select.gather=partitioned`` on CPU ranks.

Per pool size: W gloo ranks on this machine, each holding only its own rows of a
synthetic unit float16 pool (contiguous 10,000-row "shards" dealt round-robin, as rank
files hold them; clustered, with 1% planted near-duplicates), run MedDEL with a fixed
k. Printed per size and mode: wall time, the largest per-rank peak RSS, that peak above
the rank's process baseline (its RSS just before the pool rows are built: interpreter,
torch and faiss), the all-gather footprint (N x D x 2 bytes, the matrix every rank holds
with ``gather=all``) and the ratios of both peaks to it, and time against the smallest size. ``--modes all`` adds the gathered run as the
baseline, side by side (it needs about three footprints per rank while gathering).

    python benchmarks/bench_select_scale.py                          # 1M and 10M, partitioned
    python benchmarks/bench_select_scale.py --sizes 1000000 --modes all partitioned

Targets: per-rank peak <= 60% of the all-gather footprint (at W = 2 the rows alone are
50%, so the peak above the baseline is the figure to hold to it); time <= 12x for 10x rows.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SHARD_ROWS = 10_000


def shard_rows(shard: int, n: int, dim: int, centres: np.ndarray, seed: int) -> np.ndarray:
    """Rows of one shard (deterministic from its id): noisy copies of centres, 1% near-duplicates."""
    rng = np.random.default_rng([seed, shard])
    m = min(SHARD_ROWS, n - shard * SHARD_ROWS)
    x = centres[rng.integers(0, len(centres), m)] + 0.6 * rng.normal(size=(m, dim)).astype(np.float32) / np.sqrt(dim)
    dup = rng.choice(m, size=max(2, m // 100), replace=False)
    x[dup[1:]] = x[dup[:-1]] + 1e-3 * rng.normal(size=(len(dup) - 1, dim)).astype(np.float32)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float16)


def local_pool(n: int, dim: int, rank: int, world: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """This rank's shards (r, r+W, ...) written into one preallocated array, and their pool positions."""
    centres = np.random.default_rng(seed).normal(size=(max(2, n // 500), dim)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    shards = list(range(rank, -(-n // SHARD_ROWS), world))
    pos = np.concatenate([np.arange(s * SHARD_ROWS, min((s + 1) * SHARD_ROWS, n)) for s in shards])
    rows = np.empty((len(pos), dim), dtype=np.float16)
    at = 0
    for s in shards:
        part = shard_rows(s, n, dim, centres, seed)
        rows[at : at + len(part)] = part
        at += len(part)
    return rows, pos


def pool_keys(n: int) -> np.ndarray:
    """'k000000000', 'k000000001', ...: sorted like the pool, built digit by digit (no wide temporaries).

    Shape:
        -> (n,) <U10.
    """
    codes = np.empty((n, 10), dtype=np.uint32)
    codes[:, 0] = ord("k")
    rest = np.arange(n, dtype=np.uint32)  # n < 10^9: the digits left, divided in place
    for j in range(9):
        codes[:, 9 - j] = rest % 10 + ord("0")
        rest //= 10
    return codes.view("<U10").reshape(n)


def rss_gib() -> float:
    """This process's resident memory now (Linux)."""
    fields = Path("/proc/self/statm").read_text().split()
    return int(fields[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30


def rank_main(rank: int, world: int, port: int, args: argparse.Namespace, n: int, mode: str, out: str) -> None:
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    from dataeff import dist
    from dataeff.config import load_config
    from dataeff.select.cluster import import_faiss
    from dataeff.select.config import SelectConfig
    from dataeff.select.distributed_cluster import LocalRows
    from dataeff.select.meddel_run import run_meddel

    dist.init(timeout_s=3600)
    import_faiss()  # rank 0 trains k-means: the import belongs to the baseline on every rank
    baseline = rss_gib()
    rows, pos = local_pool(n, args.dim, rank, world, args.seed)
    # As the stage: gathered, every rank holds the keys; partitioned, none does while MedDEL
    # runs (rank 0 reads them again for the manifest once the rows are freed).
    keys = pool_keys(n) if mode == "all" else None
    cfg = load_config(
        SelectConfig,
        None,
        [
            "embeddings=x",
            "out=x",
            "ratio=0.05",
            f"cluster.k={args.k}",
            f"cluster.niter={args.niter}",
            "cluster.device=cpu",
        ],
    )
    dist.barrier()
    t = time.time()
    if mode == "all":  # what gather_pool does: every rank gets every row, in key order
        emb = np.empty((n, args.dim), dtype=np.float16)
        emb[dist.all_gather_concat(pos)] = dist.all_gather_concat(rows)
        del rows
        d = run_meddel(emb, keys, None, cfg, rank, world)
    else:
        d = run_meddel(LocalRows(rows, pos, n), None, None, cfg, rank, world)  # type: ignore[arg-type]
    wall = time.time() - t
    record = {
        "rank": rank,
        "wall_s": wall,
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "baseline_gib": baseline,
        "kept": int(d.kept.sum()),
        "timings_s": d.info["timings_s"],
    }
    Path(out, f"rank{rank}.json").write_text(json.dumps(record))
    dist.destroy()


def run(args: argparse.Namespace, n: int, mode: str) -> dict:
    with tempfile.TemporaryDirectory() as out:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        mp.spawn(rank_main, args=(args.ranks, port, args, n, mode, out), nprocs=args.ranks, join=True)
        recs = [json.loads(Path(out, f"rank{r}.json").read_text()) for r in range(args.ranks)]
    return {
        "wall_s": max(r["wall_s"] for r in recs),
        "peak_rss_gib": max(r["peak_rss_gib"] for r in recs),
        "above_gib": max(r["peak_rss_gib"] - r["baseline_gib"] for r in recs),
        "rss_by_rank": [round(r["peak_rss_gib"], 3) for r in recs],
        "above_by_rank": [round(r["peak_rss_gib"] - r["baseline_gib"], 3) for r in recs],
        "kept": recs[0]["kept"],
        "timings_s": recs[0]["timings_s"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[1_000_000, 10_000_000])
    ap.add_argument("--modes", nargs="+", default=["partitioned"], choices=["all", "partitioned"])
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--k", type=int, default=1000, help="clusters, fixed for every size")
    ap.add_argument("--niter", type=int, default=10, help="k-means iterations (stage default: 100)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    print(
        f"\n## MedDEL selection, {args.ranks} CPU ranks, {args.dim}-d float16, k = {args.k}, "
        f"{args.niter} k-means iterations, ratio 0.05\n"
    )
    print(
        "| N | gather | wall s | per-rank peak RSS GiB | above baseline GiB | all-gather footprint GiB "
        "| peak / footprint | above baseline / footprint | time vs first N |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    first: dict[str, float] = {}
    for n in args.sizes:
        footprint = n * args.dim * 2 / 2**30
        for mode in args.modes:
            r = run(args, n, mode)
            first.setdefault(mode, r["wall_s"])
            print(
                f"| {n:,} | {mode} | {r['wall_s']:.1f} | {r['peak_rss_gib']:.2f} | {r['above_gib']:.2f} | "
                f"{footprint:.2f} | {r['peak_rss_gib'] / footprint:.0%} | {r['above_gib'] / footprint:.0%} | "
                f"{r['wall_s'] / first[mode]:.1f}x |",
                flush=True,
            )
            print(
                f"<!-- {n} {mode}: kept {r['kept']}, peak RSS by rank {r['rss_by_rank']}, "
                f"above baseline by rank {r['above_by_rank']}, phases {r['timings_s']} -->",
                flush=True,
            )
    print(
        "\ntargets: per-rank peak (above the process baseline) <= 60% of the footprint; "
        "time <= 12x for 10x rows (fixed k)"
    )


if __name__ == "__main__":
    main()
