"""One-command GPU check (``make gpu-check``): the GPU paths of dataeff, measured in under 8 minutes.

On one CUDA GPU, from a built virtualenv (``pip install -e '.[gpu,dev]'``), it runs in turn:

1. ``make test-gpu``: the ``gpu``-marked tests (DeepSpeed ZeRO-2 bf16 pre-training, resume,
   fused AdamW, GPU fine-tuning);
2. MAE pre-training of ViT-B/16 at 224 px under DeepSpeed ZeRO-2 bf16 (dataeff's own
   ``build_trainer`` and ``MAE``) for a fixed number of steps: step time, images/s and
   MFU = FLOPs per step (counted by Lightning's ``measure_flops``, i.e. torch's FLOP
   counter, forward + backward) / step time / the GPU's dense bf16 peak;
3. embedding images/s with ViT-B/16 (``embed.embed_batch``, bf16 autocast, batches already
   on the device: the model's rate, not decoding);
4. faiss-gpu k-means (``cluster.train_kmeans``) on 1M x 768 unit rows, k = sqrt(N);
5. SAM vit_b (random weights; speed only) images/s through OptiDEL's batched pass and
   through ``SamAutomaticMaskGenerator`` one image at a time, with their patch sets compared
   (``benchmarks/bench_optidel.py``), at OptiDEL's settings and with every mask kept.

Each step runs in its own process under a time limit, so one failure or hang is reported
and the others still run. It writes one JSON (``--out``) and prints a table. Exit code 0
when every step passed.

Without a CUDA GPU it says so, runs the same steps as ``--dry-run`` (tiny sizes on the
CPU; the DeepSpeed step becomes the same Lightning module under a plain CPU trainer, fp32,
labelled as such) and exits 0 when they pass: a dry run checks the script, it measures
nothing about GPUs. ``tests/integration/test_gpu_check.py`` runs the dry run.

    python benchmarks/gpu_check.py              # GPU (or the dry run, when there is none)
    python benchmarks/gpu_check.py --dry-run    # tiny sizes, CPU
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
#: The whole check must fit in this many seconds on the GPU (the steps' limits below add up to it).
BUDGET_S = 480
#: Dense (no sparsity) bf16 tensor-core peaks, TFLOP/s, from NVIDIA's data sheets; first match on the device name.
DENSE_BF16_TFLOPS = (
    ("h200", 989.4),
    ("h100 pcie", 756.0),
    ("h100 nvl", 835.0),
    ("h100", 989.4),
    ("a100", 312.0),
    ("l40s", 362.0),
    ("l40", 181.0),
    ("l4", 121.0),
)


#: The dry run's encoder: a random 2-block, 64-wide ViT at 32 px (the tests' tiny ViT).
TINY_VIT = dict(
    name="vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, embed_dim=64, num_heads=2, allow_random_init=True
)


def peak_tflops(device_name: str, override: float) -> float | None:
    """The GPU's dense bf16 peak in TFLOP/s: ``override`` when > 0, else from the table, else None."""
    if override > 0:
        return override
    name = device_name.lower()
    return next((peak for chip, peak in DENSE_BF16_TFLOPS if chip in name), None)


# --------------------------------------------------------------------------- steps (each in its own process)


def step_tests(args: argparse.Namespace) -> dict[str, Any]:
    """``make test-gpu``: pytest on the ``gpu`` marker (the dry run collects tests/gpu only)."""
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider"]
    cmd += ["tests/gpu"] if args.dry_run else []
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    print(proc.stdout[-4000:], proc.stderr[-4000:], sep="\n")
    lines = [ln for ln in proc.stdout.splitlines() if re.search(r"\d+ (passed|failed|skipped|error)", ln)]
    counts = {
        word: int(n) for n, word in re.findall(r"(\d+) (passed|failed|skipped|errors?)", lines[-1] if lines else "")
    }
    # On a CPU the dry run collects tests/gpu, whose module skips itself: pytest calls that "no tests" (5).
    if proc.returncode != 0 and not (args.dry_run and proc.returncode == 5 and counts.get("skipped")):
        raise RuntimeError(f"{' '.join(cmd[2:])} exited {proc.returncode}: {lines[-1] if lines else 'no summary'}")
    if not args.dry_run and counts.get("skipped"):
        # On a GPU machine a skipped GPU test means a missing piece (DeepSpeed, faiss-gpu).
        raise RuntimeError(f"{counts['skipped']} GPU test(s) skipped on a GPU machine: install dataeff[gpu]")
    return {"command": " ".join(["pytest", *cmd[3:]]), **counts}


def _sync(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def step_mae(args: argparse.Namespace) -> dict[str, Any]:
    """MAE pre-training steps through dataeff's trainer shell: step time, images/s, FLOPs and MFU."""
    import pytorch_lightning as pl
    import torch
    from pytorch_lightning.utilities import measure_flops

    from dataeff.config import EncoderConfig, TrainerConfig, WandbConfig
    from dataeff.models.mae import MAE, MAEConfig, mask_noise
    from dataeff.trainer import build_trainer

    if args.dry_run:
        enc = EncoderConfig(**TINY_VIT)
        mae_cfg, batch, steps, warmup = MAEConfig(decoder_depth=1, decoder_dim=32, decoder_heads=2), 4, 3, 1
        # The DeepSpeed step's stand-in: the same module and trainer shell, plain Lightning on the CPU, fp32.
        layout = dict(accelerator="cpu", strategy="auto", precision="32-true")
    else:
        enc = EncoderConfig(name="vit_base_patch16_224", allow_random_init=True)
        mae_cfg, batch, steps, warmup = MAEConfig(), args.mae_batch, 30, 5
        layout = dict(accelerator="gpu", strategy="deepspeed_stage_2", precision="bf16-mixed")
    trainer_cfg = TrainerConfig(
        devices="1", max_steps=warmup + steps, checkpoint_every_n_steps=10**9, progress_bar=False, **layout
    )
    torch.manual_seed(0)
    model = MAE(enc, mae_cfg, max_steps=warmup + steps)
    side = model.grid[0] * model.patch
    images = torch.randn(batch, 3, side, side)
    device = torch.device("cuda" if not args.dry_run else "cpu")

    # FLOPs of one training step (forward + backward; the optimiser's few elementwise FLOPs are left out).
    model.to(device)
    x, noise = images.to(device), mask_noise(batch, model.num_patches, 0).to(device)
    flops = measure_flops(model, lambda: model(x, noise)[0].mean(), lambda loss: loss)
    model.zero_grad(set_to_none=True)
    model.cpu()

    class StepTimer(pl.Callback):
        def __init__(self) -> None:
            self.seconds: list[float] = []
            self.t0 = 0.0

        def on_train_batch_start(self, trainer: pl.Trainer, *_: Any) -> None:
            _sync(trainer.strategy.root_device)
            self.t0 = time.perf_counter()

        def on_train_batch_end(self, trainer: pl.Trainer, *_: Any) -> None:
            _sync(trainer.strategy.root_device)
            self.seconds.append(time.perf_counter() - self.t0)

    class SameBatch(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return warmup + steps

        def __getitem__(self, i: int) -> dict[str, Any]:
            return {"image": images}

    timer = StepTimer()
    with tempfile.TemporaryDirectory() as out:
        trainer, info = build_trainer(
            trainer_cfg,
            out,
            WandbConfig(enabled=False),
            "gpu-check",
            {},
            [timer],
            micro_batch_size=batch,
            limit_val_batches=0,
            use_distributed_sampler=False,  # one device; the loader yields whole batches
        )
        loader = torch.utils.data.DataLoader(SameBatch(), batch_size=None)
        trainer.fit(model, train_dataloaders=loader)
    measured = sorted(timer.seconds[warmup:])
    step_s = measured[len(measured) // 2]  # median: robust to one slow step
    result: dict[str, Any] = {
        "runner": "plain Lightning on the CPU (dry-run stand-in for DeepSpeed)" if args.dry_run else "DeepSpeed ZeRO-2",
        "encoder": enc.name,
        "image_size": side,
        "batch": batch,
        "steps_timed": len(measured),
        "strategy": info["strategy"],
        "precision": info["precision"],
        "step_s": step_s,
        "images_per_s": batch / step_s,
        "tflop_per_step": flops / 1e12,
        "achieved_tflop_s": flops / step_s / 1e12,
        "loss_finite": bool(torch.isfinite(trainer.callback_metrics["loss"]).item()),
    }
    if not args.dry_run:
        name = torch.cuda.get_device_name(0)
        peak = peak_tflops(name, args.peak_tflops)
        result.update(
            peak_bf16_tflop_s=peak,
            mfu=flops / step_s / (peak * 1e12) if peak else None,
            peak_memory_gib=torch.cuda.max_memory_allocated() / 2**30,
        )
    if not result["loss_finite"]:
        raise RuntimeError(f"MAE loss is not finite after {warmup + steps} steps")
    return result


def step_embed(args: argparse.Namespace) -> dict[str, Any]:
    """Embedding images/s of a ViT (the embed stage's batch function), batches already on the device."""
    import torch

    from dataeff.config import EncoderConfig
    from dataeff.models.encoder import build_encoder
    from dataeff.select.embed import embed_batch

    if args.dry_run:
        cfg = EncoderConfig(**TINY_VIT)
        device, amp, batch, batches = torch.device("cpu"), None, 8, 3
    else:
        cfg = EncoderConfig(name="vit_base_patch16_224", allow_random_init=True)
        device, amp, batch, batches = torch.device("cuda"), torch.bfloat16, args.embed_batch, 20
    model = build_encoder(cfg).to(device).eval()
    side = int(model.patch_embed.img_size[0])
    x = torch.randn(batch, 3, side, side, device=device)
    for _ in range(2):  # warm-up (kernels, autotuning)
        embed_batch(model, x, "cls", amp)
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(batches):
        rows = embed_batch(model, x, "cls", amp)  # returns on the CPU: each batch is complete
    seconds = time.perf_counter() - t0
    return {
        "encoder": cfg.name,
        "image_size": side,
        "batch": batch,
        "precision": "bf16 autocast" if amp else "fp32",
        "images_per_s": batch * batches / seconds,
        "dim": int(rows.shape[1]),
    }


def step_kmeans(args: argparse.Namespace) -> dict[str, Any]:
    """faiss k-means (the select stage's ``train_kmeans``) on N x D unit rows, k = round(sqrt(N))."""
    import numpy as np

    from dataeff.select.cluster import default_k, gpu_available, train_kmeans

    n, d, niter = (2000, 32, 5) if args.dry_run else (args.kmeans_rows, 768, 20)
    use_gpu = not args.dry_run
    if use_gpu and not gpu_available():
        raise RuntimeError("the installed faiss sees no GPU: install dataeff[gpu] (faiss-gpu) instead of faiss-cpu")
    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, d), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    k = default_k(n)
    t0 = time.perf_counter()
    centroids = train_kmeans(x, k, niter, seed=0, use_gpu=use_gpu)
    seconds = time.perf_counter() - t0
    if not np.isfinite(centroids).all():
        raise RuntimeError("k-means returned non-finite centroids")
    return {"rows": n, "dim": d, "k": k, "niter": niter, "faiss": "gpu" if use_gpu else "cpu", "train_s": seconds}


def step_sam(args: argparse.Namespace) -> dict[str, Any]:
    """SAM images/s, batched pass against the generator one image at a time (``bench_optidel.real_sam_rows``)."""
    import torch
    from bench_optidel import load_images, real_sam_rows

    model, size, n, grid, relaxed_grid = ("tiny", 64, 4, 4, 4) if args.dry_run else ("vit_b", 320, 4, 32, 8)
    device = torch.device("cpu" if args.dry_run else "cuda")
    images = [image for _, image in load_images(n, size)]
    runs = real_sam_rows(model, device, images, grid, relaxed_grid)
    return {"model": model, "image_size": size, "images_per_batch": n, "runs": runs}


#: name -> (what it measures, its function, its time limit on the GPU in seconds).
STEPS: dict[str, tuple[str, Callable[[argparse.Namespace], dict[str, Any]], int]] = {
    "tests": ("make test-gpu", step_tests, 170),
    "mae": ("MAE pre-training", step_mae, 100),
    "embed": ("embedding", step_embed, 40),
    "kmeans": ("faiss k-means", step_kmeans, 50),
    "sam": ("SAM passes", step_sam, 120),
}
assert sum(limit for _, _, limit in STEPS.values()) <= BUDGET_S


# --------------------------------------------------------------------------- the parent: run, collect, print


def describe(name: str, r: dict[str, Any]) -> str:
    """One table cell for a passed step."""
    if name == "tests":
        counts = {k: v for k, v in r.items() if k not in ("command", "status", "wall_s")}
        return ", ".join(f"{v} {k}" for k, v in counts.items()) + f" (`{r['command']}`)"
    if name == "mae":
        mfu = f", MFU {r['mfu']:.1%} of {r['peak_bf16_tflop_s']:.0f} TFLOP/s" if r.get("mfu") else ""
        if "mfu" in r and r["mfu"] is None:
            mfu = ", MFU unknown: the GPU's bf16 peak is not in the table (pass --peak-tflops)"
        mem = f", peak {r['peak_memory_gib']:.1f} GiB" if "peak_memory_gib" in r else ""
        return (
            f"{r['encoder']} {r['image_size']} px, batch {r['batch']}, {r['runner']}, {r['precision']}: "
            f"{r['step_s'] * 1e3:.0f} ms/step, {r['images_per_s']:.0f} img/s, "
            f"{r['achieved_tflop_s']:.3g} TFLOP/s{mfu}{mem}"
        )
    if name == "embed":
        return (
            f"{r['encoder']} {r['image_size']} px, batch {r['batch']}, {r['precision']}: {r['images_per_s']:.0f} img/s"
        )
    if name == "kmeans":
        return (
            f"{r['rows']:,} x {r['dim']}, k={r['k']}, {r['niter']} iterations, faiss {r['faiss']}: {r['train_s']:.1f} s"
        )
    from bench_optidel import agreement

    return f"{r['model']}, {r['image_size']} px, {r['runs'][0]['images']} images: " + "; ".join(
        f"{run['setting']}, {run['points_per_side']}x{run['points_per_side']} points: batched "
        f"{run['batched_img_s']:.2f} img/s vs generator {run['baseline_img_s']:.2f} img/s = **{run['speedup']:.1f}x "
        f"baseline**, patches {run['patches_baseline']} / {run['patches_batched']}: same boxes {agreement(run)}"
        for run in r["runs"]
    )


def run_steps(args: argparse.Namespace) -> dict[str, Any]:
    """Every step in its own process, each under its limit (scaled for the dry run), logs beside the JSON."""
    out = Path(args.out)
    logs = out.with_suffix("")
    logs.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {}
    for name, (title, _, limit) in STEPS.items():
        if args.only and name not in args.only:
            continue
        print(f"== {title} ...", flush=True)
        result_file = logs / f"{name}.json"
        result_file.unlink(missing_ok=True)
        cmd = [sys.executable, __file__, "--step", name, "--result", str(result_file)]
        cmd += ["--dry-run"] if args.dry_run else []
        cmd += ["--mae-batch", str(args.mae_batch), "--embed-batch", str(args.embed_batch)]
        cmd += ["--kmeans-rows", str(args.kmeans_rows), "--peak-tflops", str(args.peak_tflops)]
        t0 = time.perf_counter()
        with open(logs / f"{name}.log", "w") as log_file:
            try:
                # The dry run's limits are looser: it runs on whatever CPU is there, often a shared one.
                timeout = limit * (3 if args.dry_run else 1)
                rc = subprocess.run(
                    cmd, cwd=REPO, stdout=log_file, stderr=subprocess.STDOUT, timeout=timeout
                ).returncode
            except subprocess.TimeoutExpired:
                rc = None
        seconds = time.perf_counter() - t0
        if rc == 0 and result_file.is_file():
            results[name] = {"status": "passed", "wall_s": round(seconds, 1), **json.loads(result_file.read_text())}
        else:
            tail = (logs / f"{name}.log").read_text(errors="replace").strip().splitlines()[-1:] or ["no output"]
            why = f"over its {timeout} s limit" if rc is None else f"exit code {rc}: {tail[0][:300]}"
            results[name] = {"status": "failed", "wall_s": round(seconds, 1), "error": why}
        print(f"   {results[name]['status']} in {seconds:.1f} s", flush=True)
    return results


def machine(dry_run: bool) -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__, "dry_run": dry_run}
    if torch.cuda.is_available():
        info.update(gpu=torch.cuda.get_device_name(0), cuda=torch.version.cuda, gpus_visible=torch.cuda.device_count())
    else:
        info.update(gpu=None, cpu_threads=torch.get_num_threads())
    return info


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dry-run", action="store_true", help="tiny sizes on the CPU (what runs where there is no GPU)")
    ap.add_argument("--out", default=str(REPO / "bench-out" / "gpu_check.json"), help="the JSON to write")
    ap.add_argument("--only", nargs="*", choices=list(STEPS), help="run only these steps")
    ap.add_argument("--mae-batch", type=int, default=128, help="MAE micro-batch on the GPU")
    ap.add_argument("--embed-batch", type=int, default=256, help="embedding batch on the GPU")
    ap.add_argument("--kmeans-rows", type=int, default=1_000_000, help="k-means rows on the GPU (x 768)")
    ap.add_argument("--peak-tflops", type=float, default=0.0, help="dense bf16 peak for MFU (0 = from the GPU's name)")
    ap.add_argument("--step", choices=list(STEPS), help=argparse.SUPPRESS)  # one step, in a child process
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.step:
        result = STEPS[args.step][1](args)
        Path(args.result).write_text(json.dumps(result, indent=2, default=float))
        return 0

    import torch

    if not args.dry_run and not torch.cuda.is_available():
        print(
            "gpu-check: no CUDA GPU visible, so no GPU figure is measured. Running the dry run instead "
            "(tiny sizes, CPU; the DeepSpeed step as a plain CPU Lightning run) to check the script itself."
        )
        args.dry_run = True
    t0 = time.perf_counter()
    steps = run_steps(args)
    wall = time.perf_counter() - t0
    report = {"machine": machine(args.dry_run), "wall_s": round(wall, 1), "budget_s": BUDGET_S, "steps": steps}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, default=float))

    label = "DRY RUN (tiny sizes, CPU; no GPU figure)" if args.dry_run else f"GPU: {report['machine']['gpu']}"
    print(f"\n{label}; torch {report['machine']['torch']}; {wall:.0f} s in all (budget {BUDGET_S} s)\n")
    print("| step | status | result |")
    print("|---|---|---|")
    for name, r in steps.items():
        cell = describe(name, r) if r["status"] == "passed" else r["error"]
        print(f"| {STEPS[name][0]} | {r['status']} ({r['wall_s']:.0f} s) | {cell} |")
    print(f"\nwritten: {out} (step logs in {out.with_suffix('')}/)")
    failed = [n for n, r in steps.items() if r["status"] != "passed"]
    if failed:
        print(f"gpu-check: failed: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    # Children inherit a quiet, offline environment.
    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("WANDB_SILENT", "true")
    sys.exit(main())
