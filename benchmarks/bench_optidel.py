"""OptiDEL throughput: SAM patch extraction, MAE hardness scoring, mosaic composition.

Runs the three OptiDEL stages on real (downscaled) Kvasir-SEG frames and prints one
markdown table: images/s of each stage, its share of the OptiDEL time, and its cost
per image relative to a baseline run in the same process — one forward pass of the
scoring ViT over the same images (what an embedding pass, e.g. for MedDEL, costs).

CPU default: the tiny random SAM (tests/demo model). With a GPU, ``--model vit_b``
times a randomly initialised ViT-B SAM (speed only; nothing is downloaded).

    python benchmarks/bench_optidel.py                       # tiny SAM, CPU, ~1 min
    python benchmarks/bench_optidel.py --hardness-masks 1    # the single-mask hardness of before
    python benchmarks/bench_optidel.py --model vit_b --points-per-side 32 --size 320   # GPU
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from dataeff.config import EncoderConfig
from dataeff.models.encoder import pooled_features
from dataeff.models.mae import MAE, MAEConfig
from dataeff.select.mosaic_shards import mosaic_sample
from dataeff.select.optidel import mask_seeds
from dataeff.select.sam_hard import SamConfig, build_sam, extract_and_score, mask_generator

REPO = Path(__file__).resolve().parents[1]


def load_images(n: int, size: int) -> list[tuple[str, np.ndarray]]:
    paths = sorted((REPO / "data" / "kvasir-seg" / "images").glob("*.jpg"))[:n]
    out = []
    for p in paths:
        img = Image.open(p).convert("RGB")
        scale = size / max(img.size)
        img = img.resize(
            (max(1, round(img.width * scale)), max(1, round(img.height * scale))), Image.Resampling.BICUBIC
        )
        out.append((p.stem, np.asarray(img)))
    return out


def build_scorer(img_size: int, device: torch.device) -> MAE:
    torch.manual_seed(0)
    enc = EncoderConfig(
        name="vit_tiny_patch16_224",
        img_size=img_size,
        patch_size=8,
        depth=2,
        embed_dim=64,
        num_heads=2,
        allow_random_init=True,
    )
    return MAE(enc, MAEConfig(decoder_depth=1, decoder_dim=32, decoder_heads=2)).to(device).eval()


def to_input(batch: np.ndarray, device: torch.device) -> torch.Tensor:
    x = torch.from_numpy(batch).permute(0, 3, 1, 2).float().div(255.0)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    return ((x - mean) / std).to(device)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=24, help="Kvasir-SEG frames to process")
    ap.add_argument("--size", type=int, default=64, help="long side of the frames, px")
    ap.add_argument("--model", default="tiny", help="tiny (CPU ok) or vit_b/vit_l/vit_h (random init; GPU advised)")
    ap.add_argument("--points-per-side", type=int, default=4, help="SAM prompt grid side")
    ap.add_argument("--score-size", type=int, default=32, help="scorer input side, px")
    ap.add_argument("--mosaics", type=int, default=64, help="mosaics to compose")
    ap.add_argument(
        "--ratio", type=float, default=0.05, help="selection ratio R: R*|D| mosaics are composed per |D| images"
    )
    ap.add_argument(
        "--hardness-masks", type=int, default=4, help="MAE masks averaged per hardness score (optidel.hardness_masks)"
    )
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ap.add_argument("--device", default="auto", help="auto, cpu or cuda")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(
        "cuda"
        if args.device == "auto" and torch.cuda.is_available()
        else ("cpu" if args.device == "auto" else args.device)
    )
    if args.model != "tiny" and device.type != "cuda":
        print(f"note: SAM {args.model} on CPU is very slow; pass --model tiny or run on a GPU")

    images = load_images(args.images, args.size)
    n = len(images)
    cfg = SamConfig(
        model=args.model,
        points_per_side=args.points_per_side,
        points_per_batch=64,
        pred_iou_thresh=0.0,
        stability_score_thresh=0.0,
        min_area_frac=0.0,
        max_area_frac=1.0,
        min_box_side=2,
        device=device.type,
    )
    sam = build_sam(cfg, device, allow_random_init=True)
    generator = mask_generator(sam, cfg)
    scorer = build_scorer(args.score_size, device)

    seeds = mask_seeds(0, args.hardness_masks)

    def score(batch: np.ndarray) -> np.ndarray:  # as optidel_run.mae_scorer: mean loss over K fixed masks
        x = to_input(batch, device)
        return (sum(scorer.reconstruction_loss(x, s) for s in seeds) / len(seeds)).cpu().numpy()

    generator.generate(images[0][1])  # warm-up (allocations, kernels)
    t0 = time.perf_counter()
    result = extract_and_score(images, generator, cfg, args.score_size, score, batch_size=32)
    total = time.perf_counter() - t0
    sam_s, score_s = float(result["sam_s"]), float(result["score_s"])
    patches = len(result["score"])

    # Composition: mosaics from the extracted boxes (or whole frames when SAM found too few).
    rec = {k: result[k] for k in ("source", "box", "score")}
    if patches < 4:
        rec = {
            "source": np.array([k for k, _ in images]),
            "score": np.zeros(n, np.float32),
            "box": np.array([[0, 0, im.shape[1], im.shape[0]] for _, im in images], dtype=np.int32),
        }
    by_key = dict(images)
    crops = {
        (str(s), tuple(int(v) for v in b)): by_key[str(s)][b[1] : b[3], b[0] : b[2]]
        for s, b in zip(rec["source"], rec["box"], strict=False)
    }
    sizes = {k: (im.shape[1], im.shape[0]) for k, im in images}
    rng = np.random.default_rng(0)
    groups = rng.integers(0, len(rec["source"]), size=(args.mosaics, 4))
    t0 = time.perf_counter()
    for i, g in enumerate(groups):
        mosaic_sample(f"bench_mosaic{i:06d}", "bench", g, rec, np.zeros(len(rec["source"]), np.int64), crops, sizes)
    compose_s = time.perf_counter() - t0
    compose_per_image = args.ratio * compose_s / args.mosaics  # R mosaics per pool image

    # Baseline: one encoder forward over the same frames (an embedding pass).
    batch = np.stack([np.asarray(Image.fromarray(im).resize((args.score_size, args.score_size))) for _, im in images])
    with torch.no_grad():
        pooled_features(scorer.encoder, to_input(batch, device), "cls")
        t0 = time.perf_counter()
        pooled_features(scorer.encoder, to_input(batch, device), "cls")
        base_s = time.perf_counter() - t0
    base_per_image = base_s / n

    rows = [
        ("SAM masks", sam_s / n, f"{n / sam_s:.1f} img/s"),
        ("MAE hardness (patches + originals)", score_s / n, f"{(patches + n) / score_s:.0f} crops/s"),
        (
            f"composition (crop, tile, PNG) at R={args.ratio}",
            compose_per_image,
            f"{args.mosaics / compose_s:.0f} mosaics/s",
        ),
    ]
    optidel = sum(t for _, t, _ in rows)
    print(
        f"\nOptiDEL throughput — SAM {args.model} ({sum(p.numel() for p in sam.parameters()) / 1e6:.2f}M params, "
        f"{args.points_per_side}x{args.points_per_side} prompts), {n} frames at {args.size} px, {patches} patches "
        f"({patches / n:.1f}/frame), scorer ViT 2x64 at {args.score_size} px, {args.hardness_masks} mask(s) per score, "
        f"device {device}, {args.threads} thread(s)\n"
    )
    print("| stage | own rate | pool images/s | share of OptiDEL time | time per image vs baseline |")
    print("|---|---:|---:|---:|---:|")
    for name, per, rate in rows:
        print(f"| {name} | {rate} | {1.0 / per:.1f} | {per / optidel:.1%} | {per / base_per_image:.1f}x |")
    print(f"| **OptiDEL total** | | **{1.0 / optidel:.1f}** | 100% | **{optidel / base_per_image:.1f}x** |")
    print(f"| baseline: encoder forward (embedding pass) | | {1.0 / base_per_image:.1f} | – | 1.0x |")
    print(
        f"\nwall time of extract_and_score: {total:.2f} s (SAM {sam_s:.2f} s, scoring {score_s:.2f} s); "
        f"{args.mosaics} mosaics composed in {compose_s:.2f} s"
    )


if __name__ == "__main__":
    main()
