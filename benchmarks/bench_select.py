"""Benchmark of ``dataeff select`` (MedDEL) on synthetic clustered float16 embeddings.

Per size: MedDEL wall time per phase (k-means, assignment, dedup, ratio fill, manifest
write) and peak RSS, beside two references on the same embeddings in the same process:
(a) the limit — a bare ``faiss.Kmeans`` (same k, iterations, spherical) plus one
nearest-centroid search; (b) the naive baseline — scikit-learn ``MiniBatchKMeans``
plus brute-force within-cluster cosine dedup (every pair of each cluster).
Also: embedding throughput of vit_small at 224 px on CPU (random init).

    python benchmarks/bench_select.py                 # sizes 100k and 1M
    python benchmarks/bench_select.py --sizes 20000 --naive-cap 20000
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dataeff.config import load_config  # noqa: E402
from dataeff.select import cluster as C  # noqa: E402
from dataeff.select import manifest  # noqa: E402
from dataeff.select.config import SelectConfig  # noqa: E402
from dataeff.select.meddel_run import run_meddel  # noqa: E402


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def synthetic(n: int, dim: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Unit float16 rows around n/500 centres, 1% near-duplicates; generated in chunks (no float32 copy)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(max(2, n // 500), dim)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    out = np.empty((n, dim), dtype=np.float16)
    for s in range(0, n, 65536):
        e = min(s + 65536, n)
        x = centres[rng.integers(0, len(centres), e - s)] + 0.6 * rng.normal(size=(e - s, dim)).astype(
            np.float32
        ) / np.sqrt(dim)
        out[s:e] = x / np.linalg.norm(x, axis=1, keepdims=True)
    dup = rng.choice(n, size=n // 100, replace=False)
    out[dup[1:]] = out[dup[:-1]]  # 1% exact-ish near-duplicates
    keys = np.char.add("k", np.char.zfill(np.arange(n).astype(str), 8))
    return keys, out


def bench_meddel(keys: np.ndarray, emb: np.ndarray, niter: int) -> dict:
    cfg = load_config(
        SelectConfig, None, ["embeddings=x", "out=x", "ratio=0.05", f"cluster.niter={niter}", "cluster.device=cpu"]
    )
    t = time.time()
    d = run_meddel(emb, keys, None, cfg, 0, 1)
    total = time.time() - t
    t = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        frame = manifest.selection_frame(keys, d)
        manifest.write_selection(tmp, frame, manifest.build_summary("meddel", 0.05, frame, {}, {}, dict(d.info)))
    write = time.time() - t
    tm = d.info["timings_s"]
    return {
        **tm,
        "manifest_write": write,
        "total": total + write,
        "k": d.info["k"],
        "kept": int(d.kept.sum()),
        "rss": peak_rss_gib(),
    }


def bench_limit(emb: np.ndarray, k: int, niter: int, seed: int) -> float:
    import faiss

    t = time.time()
    x = emb.astype(np.float32)
    km = faiss.Kmeans(x.shape[1], k, niter=niter, seed=seed, spherical=True, verbose=False)
    km.train(x)
    km.index.search(x, 1)
    return time.time() - t


def bench_naive(emb: np.ndarray, k: int, niter: int, seed: int) -> float:
    from sklearn.cluster import MiniBatchKMeans

    t = time.time()
    x = emb.astype(np.float32)
    labels = MiniBatchKMeans(n_clusters=k, max_iter=niter, batch_size=4096, n_init=1, random_state=seed).fit_predict(x)
    for c in range(k):
        xc = x[labels == c]
        # Brute force: every pair of the cluster, in row blocks (MiniBatchKMeans makes clusters
        # of 10^5 points at 1M, whose whole similarity matrix would not fit in memory).
        for start in range(0, len(xc), 4096):
            s = xc[start : start + 4096] @ xc.T
            s[np.arange(len(s))[:, None] + start >= np.arange(len(xc))] = -1.0  # each point vs earlier ones
            s.max(axis=1)
    return time.time() - t


def bench_embed(n_images: int, batch: int) -> float:
    import torch

    from dataeff.config import EncoderConfig
    from dataeff.models.encoder import build_encoder
    from dataeff.select.embed import embed_batch

    torch.manual_seed(0)
    model = build_encoder(EncoderConfig(name="vit_small_patch16_224", img_size=224, allow_random_init=True)).eval()
    images = torch.randn(batch, 3, 224, 224)
    embed_batch(model, images[:2], "cls", None)  # warm-up
    t = time.time()
    for _ in range(max(1, n_images // batch)):
        embed_batch(model, images, "cls", None)
    return max(1, n_images // batch) * batch / (time.time() - t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--niter", type=int, default=10, help="k-means iterations for every method (stage default: 100)")
    ap.add_argument(
        "--naive-cap",
        type=int,
        default=200_000,
        help="run the naive baseline on at most this many rows; extrapolate above",
    )
    ap.add_argument("--embed-images", type=int, default=32, help="images for the vit_small throughput row (0 = skip)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    print(
        f"\n## dataeff select (MedDEL, ratio 0.05) — {args.dim}-d float16, k = round(sqrt(N)), {args.niter} k-means iterations, 1 process\n"
    )
    print(
        "| N | k | k-means s | assign s | dedup s | ratio fill s | manifest s | MedDEL total s | peak RSS GiB | (a) faiss limit s | MedDEL / (a) | (b) naive s | (b) / MedDEL | naive |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|", flush=True)
    rows = []
    for n in args.sizes:
        keys, emb = synthetic(n, args.dim, args.seed)
        m = bench_meddel(keys, emb, args.niter)
        limit = bench_limit(emb, m["k"], args.niter, args.seed)
        cap = min(n, args.naive_cap)
        naive = bench_naive(emb[:cap], C.default_k(cap), args.niter, args.seed)
        # Above the cap: k-means work grows ~N*k ~ N^1.5 with k = sqrt(N); per-cluster dedup ~ N*(N/k) ~ N^1.5.
        note = "measured" if cap == n else f"extrapolated from {cap:,} rows as x(N/cap)^1.5"
        naive = naive * (n / cap) ** 1.5
        rows.append((n, m))
        del emb
        print(
            f"| {n:,} | {m['k']} | {m['kmeans']:.2f} | {m['assign']:.2f} | {m['dedup']:.2f} | {m['ratio_fill']:.2f} | {m['manifest_write']:.2f} | "
            f"{m['total']:.2f} | {m['rss']:.2f} | {limit:.2f} | {m['total'] / limit:.2f}x | {naive:.2f} | {naive / m['total']:.1f}x | {note} |",
            flush=True,
        )
    if len(rows) > 1:
        (n0, m0), (n1, m1) = rows[0], rows[-1]
        print(
            f"\ntime growth {n0:,} -> {n1:,}: x{m1['total'] / m0['total']:.1f} for x{n1 / n0:.0f} rows (linear would be x{n1 / n0:.0f})"
        )
    if args.embed_images:
        print(
            f"\nembedding throughput, vit_small_patch16_224 at 224 px, CPU fp32, random init: {bench_embed(args.embed_images, 16):.1f} images/s"
        )


if __name__ == "__main__":
    main()
