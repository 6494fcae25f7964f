"""OptiDEL throughput: SAM's fast pass against SamAutomaticMaskGenerator, then every OptiDEL stage.

Runs on real (downscaled) Kvasir-SEG frames and prints two markdown tables:

1. SAM: images/s of the batched pass (``sam.mask_pass=batched``: encoder batched over
   ``--images-per-batch`` images, masks reduced to boxes on the device) next to SAM's own
   ``SamAutomaticMaskGenerator`` one image at a time (``sam.mask_pass=generator``), at equal
   points per side, with the two patch sets compared (boxes paired one to one at IoU >=
   ``--match-iou``) and the speed-up printed as ``N.Nx baseline``.
2. OptiDEL: images/s of each stage (SAM through the fast pass, MAE hardness, mosaic
   composition), its share of the OptiDEL time, and its cost per image relative to one
   forward pass of the scoring ViT over the same images (an embedding pass, as MedDEL's).

CPU default: the tiny random SAM (tests/demo model). With a GPU, ``--model vit_b``
times a randomly initialised ViT-B SAM (speed only; nothing is downloaded).

    python benchmarks/bench_optidel.py                       # tiny SAM (+ vit_b rows when a GPU is present)
    python benchmarks/bench_optidel.py --hardness-masks 1    # the single-mask hardness of before
    python benchmarks/bench_optidel.py --model vit_b --points-per-side 32 --size 320 --images 8   # GPU
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from dataeff.config import EncoderConfig
from dataeff.models.encoder import pooled_features
from dataeff.models.mae import MAE, MAEConfig
from dataeff.select.mosaic_shards import mosaic_sample
from dataeff.select.optidel import mask_seeds
from dataeff.select.sam_batch import matched_boxes
from dataeff.select.sam_hard import SamConfig, build_sam, extract_and_score, filter_masks, mask_pass

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


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def compare_sam_passes(
    sam: torch.nn.Module, cfg: SamConfig, images: Sequence[np.ndarray], match_iou: float
) -> dict[str, float]:
    """Images/s of SAM's generator one image at a time and of the batched pass, and how their patches agree.

    Patches are each pass's masks after OptiDEL's filters (:func:`filter_masks`); a patch
    matches when it pairs one to one with a patch of the other pass at IoU >= ``match_iou``.
    The match rate is matched / the larger of the two patch counts, summed over images.
    """
    device = torch.device(sam.device)
    timed: dict[str, tuple[float, list]] = {}
    for name in ("generator", "batched"):
        run = mask_pass(sam, dataclasses.replace(cfg, mask_pass=name))
        run.generate_batch(images[: run.images_per_batch])  # warm-up (allocations, kernels)
        sync(device)
        t0 = time.perf_counter()
        found = run.generate_batch(images)
        sync(device)
        timed[name] = (time.perf_counter() - t0, found)

    def patches(found: list) -> list[np.ndarray]:
        return [
            filter_masks([] if isinstance(m, Exception) else m, im.shape[0], im.shape[1], cfg)["box"]
            for m, im in zip(found, images, strict=True)
        ]

    base, fast = patches(timed["generator"][1]), patches(timed["batched"][1])
    matched = sum(matched_boxes(a, b, match_iou) for a, b in zip(fast, base, strict=True))
    larger = sum(max(len(a), len(b)) for a, b in zip(fast, base, strict=True))
    n = len(images)
    return {
        "images": n,
        "points_per_side": cfg.points_per_side,
        "baseline_img_s": n / timed["generator"][0],
        "batched_img_s": n / timed["batched"][0],
        "speedup": timed["generator"][0] / timed["batched"][0],
        "patches_baseline": sum(map(len, base)),
        "patches_batched": sum(map(len, fast)),
        "patches_matched": matched,
        "match_rate": matched / larger if larger else 1.0,
        "match_iou": match_iou,
    }


def real_sam_rows(
    model: str, device: torch.device, images: Sequence[np.ndarray], grid: int, relaxed_grid: int
) -> list[dict]:
    """A random-weight SAM (speed only) compared at OptiDEL's settings and with every mask kept.

    OptiDEL's settings: ``grid`` points per side and SAM's thresholds (``configs/select/optidel.yaml``).
    Random weights predict low IoU, so those leave few patches to compare; the second setting
    (thresholds 0, ``relaxed_grid`` points per side) keeps every mask, so the patch sets are compared
    in earnest without the generator spending minutes per image encoding grid x grid x 3 masks.
    """
    per_batch = len(images)
    optidel = SamConfig(model=model, points_per_side=grid, images_per_batch=per_batch)
    relaxed = SamConfig(
        model=model,
        points_per_side=relaxed_grid,
        pred_iou_thresh=0.0,
        stability_score_thresh=0.0,
        min_area_frac=0.0,
        max_area_frac=1.0,
        min_box_side=2,
        images_per_batch=per_batch,
    )
    sam = build_sam(optidel, device, allow_random_init=True)
    return [
        {"setting": name} | compare_sam_passes(sam, cfg, images, 0.9)
        for name, cfg in (("OptiDEL's thresholds", optidel), ("every mask kept", relaxed))
    ]


def agreement(row: dict) -> str:
    """How the two patch sets of a comparison row agree, in words."""
    if not row["patches_baseline"] + row["patches_batched"]:
        return "n/a (no patches)"
    return f"{row['match_rate']:.0%} (IoU >= {row['match_iou']})"


def print_sam_table(rows: list[dict], title: str) -> None:
    print(f"\n{title}\n")
    print(
        "| points per side | generator, one image at a time | batched pass | speed-up | patches (generator / batched) | same boxes |"
    )
    print("|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        setting = f" ({r['setting']})" if "setting" in r else ""
        print(
            f"| {r['points_per_side']}{setting} | {r['baseline_img_s']:.1f} img/s | {r['batched_img_s']:.1f} img/s "
            f"| **{r['speedup']:.1f}x baseline** | {r['patches_baseline']} / {r['patches_batched']} "
            f"| {agreement(r)} |"
        )


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
    ap.add_argument("--size", type=int, default=128, help="long side of the frames, px")
    ap.add_argument("--model", default="tiny", help="tiny (CPU ok) or vit_b/vit_l/vit_h (random init; GPU advised)")
    ap.add_argument(
        "--points-per-side",
        default="4,8",
        help="SAM prompt grid sides, comma-separated: one SAM comparison row each; the OptiDEL table uses the first",
    )
    ap.add_argument("--images-per-batch", type=int, default=8, help="images per SAM encoder forward (batched pass)")
    ap.add_argument("--match-iou", type=float, default=0.9, help="IoU at which two patch boxes count as the same")
    ap.add_argument("--score-size", type=int, default=32, help="scorer input side, px")
    ap.add_argument("--mosaics", type=int, default=64, help="mosaics to compose")
    ap.add_argument(
        "--ratio", type=float, default=0.05, help="selection ratio R: R*|D| mosaics are composed per |D| images"
    )
    ap.add_argument(
        "--hardness-masks", type=int, default=4, help="MAE masks averaged per hardness score (optidel.hardness_masks)"
    )
    ap.add_argument(
        "--gpu-model",
        default="vit_b",
        help="with a GPU, also compare the passes on this SAM (random weights) at OptiDEL's settings ('' = skip)",
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
    # Relaxed thresholds: the random SAM predicts low IoU/stability everywhere (as configs/select/optidel_tiny.yaml).
    grids = [int(v) for v in args.points_per_side.split(",")]
    cfg = SamConfig(
        model=args.model,
        points_per_side=grids[0],
        points_per_batch=64,
        pred_iou_thresh=0.0,
        stability_score_thresh=0.0,
        min_area_frac=0.0,
        max_area_frac=1.0,
        min_box_side=2,
        device=device.type,
        images_per_batch=args.images_per_batch,
    )
    sam = build_sam(cfg, device, allow_random_init=True)
    rows = [
        compare_sam_passes(sam, dataclasses.replace(cfg, points_per_side=g), [im for _, im in images], args.match_iou)
        for g in grids
    ]
    print_sam_table(
        rows,
        f"SAM {args.model} ({sum(p.numel() for p in sam.parameters()) / 1e6:.2f}M params), {n} frames at "
        f"{args.size} px, {args.images_per_batch} images per encoder batch, {cfg.points_per_batch} prompts per "
        f"decoder batch, device {device}, {args.threads} thread(s)",
    )

    if device.type == "cuda" and args.gpu_model:
        real = [im for _, im in load_images(4, 320)]
        print_sam_table(
            real_sam_rows(args.gpu_model, device, real, grid=32, relaxed_grid=8),
            f"GPU: SAM {args.gpu_model} (random weights, speed only), 4 frames at 320 px, 4 images per encoder batch, "
            f"device {torch.cuda.get_device_name(device)}",
        )

    scorer = build_scorer(args.score_size, device)
    seeds = mask_seeds(0, args.hardness_masks)

    def score(batch: np.ndarray) -> np.ndarray:  # as optidel_run.mae_scorer: mean loss over K fixed masks
        x = to_input(batch, device)
        return (sum(scorer.reconstruction_loss(x, s) for s in seeds) / len(seeds)).cpu().numpy()

    fast = mask_pass(sam, cfg)
    fast.generate_batch([im for _, im in images[: cfg.images_per_batch]])  # warm-up (allocations, kernels)
    t0 = time.perf_counter()
    result = extract_and_score(images, fast, cfg, args.score_size, score, batch_size=32)
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

    stages = [
        ("SAM masks (batched pass)", sam_s / n, f"{n / sam_s:.1f} img/s"),
        ("MAE hardness (patches + originals)", score_s / n, f"{(patches + n) / score_s:.0f} crops/s"),
        (
            f"composition (crop, tile, PNG) at R={args.ratio}",
            compose_per_image,
            f"{args.mosaics / compose_s:.0f} mosaics/s",
        ),
    ]
    optidel = sum(t for _, t, _ in stages)
    print(
        f"\nOptiDEL throughput — SAM {args.model} ({grids[0]}x{grids[0]} prompts), {n} frames at {args.size} px, "
        f"{patches} patches ({patches / n:.1f}/frame), scorer ViT 2x64 at {args.score_size} px, "
        f"{args.hardness_masks} mask(s) per score, device {device}, {args.threads} thread(s)\n"
    )
    print("| stage | own rate | pool images/s | share of OptiDEL time | time per image vs baseline |")
    print("|---|---:|---:|---:|---:|")
    for name, per, rate in stages:
        print(f"| {name} | {rate} | {1.0 / per:.1f} | {per / optidel:.1%} | {per / base_per_image:.1f}x |")
    print(f"| **OptiDEL total** | | **{1.0 / optidel:.1f}** | 100% | **{optidel / base_per_image:.1f}x** |")
    print(f"| baseline: encoder forward (embedding pass) | | {1.0 / base_per_image:.1f} | – | 1.0x |")
    print(
        f"\nwall time of extract_and_score: {total:.2f} s (SAM {sam_s:.2f} s, scoring {score_s:.2f} s); "
        f"{args.mosaics} mosaics composed in {compose_s:.2f} s"
    )


if __name__ == "__main__":
    main()
