"""Pre-training throughput: streaming from shards vs the same model fed from memory.

CPU (always): MAE on vit_tiny/16 at 64 px through the real Lightning Trainer, once fed by
``PretrainDataModule`` from WebDataset shards (decode + augment in loader workers) and
once from batches already decoded in memory (the loader-free limit). Target: streaming
>= 90 % of in-memory images/s. Each mode runs in its own process so peak RSS is its own.

GPU (when CUDA is present): MAE on vit_base/16 at 224 px with DeepSpeed ZeRO-2 bf16,
in-memory batches: images/s, peak GPU memory and model FLOPs utilisation (MFU = model
FLOPs per second, counted by ``torch.utils.flop_counter``, over the device's dense bf16
peak; target >= 40 %).

    python benchmarks/bench_pretrain.py [--steps 30] [--images 256] [--batch 32] [--workers 1]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("WANDB_MODE", "disabled")

# Dense bf16 peak TFLOP/s by device name fragment (vendor data sheets, no sparsity).
PEAK_BF16_TFLOPS = {
    "H200": 989.0,
    "H100": 989.0,
    "A100": 312.0,
    "L40S": 362.0,
    "A10G": 70.0,
    "L4": 121.0,
    "V100": 125.0,
}


class _StepTimer:
    """Times optimiser steps after ``warmup`` steps (Lightning callback)."""

    def __init__(self, warmup: int) -> None:
        import pytorch_lightning as pl

        class Timer(pl.Callback):
            def __init__(inner) -> None:
                inner.t0, inner.images = None, 0

            def on_train_batch_end(inner, trainer, pl_module, outputs, batch, batch_idx) -> None:
                if trainer.global_step == warmup:
                    if pl_module.device.type == "cuda":
                        import torch

                        torch.cuda.synchronize()
                    inner.t0, inner.images = time.perf_counter(), 0
                elif inner.t0 is not None:
                    inner.images += int(batch["image"].shape[0])

            def on_train_end(inner, trainer, pl_module) -> None:
                if pl_module.device.type == "cuda":
                    import torch

                    torch.cuda.synchronize()
                inner.t1 = time.perf_counter()

        self.callback = Timer()

    def rate(self) -> float:
        return self.callback.images / (self.callback.t1 - self.callback.t0)


def _memory_loader(batches: list[dict], steps: int):
    """A loader cycling over pre-decoded batches: no decode, no augmentation, no I/O."""
    import torch

    class Cached(torch.utils.data.IterableDataset):
        def __iter__(self):
            for i in range(steps):
                yield batches[i % len(batches)]

        def __len__(self) -> int:
            return steps

    return torch.utils.data.DataLoader(Cached(), batch_size=None, num_workers=0)


def _run_cpu(mode: str, args: argparse.Namespace, shards: str, out: str, queue) -> None:
    import torch

    from dataeff.config import DataConfig, EncoderConfig, TrainerConfig, WandbConfig
    from dataeff.data.datamodules import PretrainDataModule
    from dataeff.models.mae import MAE, MAEConfig, OptimConfig
    from dataeff.trainer import build_trainer

    torch.set_num_threads(args.threads)
    data_cfg = DataConfig(
        shards=shards, image_size=64, batch_size=args.batch, num_workers=args.workers, shuffle_buffer=64
    )
    enc = EncoderConfig(name="vit_tiny_patch16_224", img_size=64, allow_random_init=True)
    model = MAE(enc, MAEConfig(), OptimConfig(warmup_steps=2), lr=1e-4, max_steps=args.steps)
    timer = _StepTimer(warmup=3)
    trainer, _ = build_trainer(
        TrainerConfig(
            accelerator="cpu",
            max_steps=args.steps,
            checkpoint_every_n_steps=10**6,
            progress_bar=False,
            log_every_n_steps=50,
        ),
        out,
        WandbConfig(enabled=False),
        "bench",
        {},
        extra_callbacks=[timer.callback],
        use_distributed_sampler=False,
    )
    dm = PretrainDataModule(data_cfg, seed=0, rank=0, world_size=1)
    if mode == "stream":
        trainer.fit(model, datamodule=dm)
    else:
        dm.setup()
        first = [b for _, b in zip(range(8), iter(dm.train_dataloader()), strict=False)]
        trainer.fit(model, train_dataloaders=_memory_loader(first, args.steps))
    peak_mb = (
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss + resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    ) / 1024
    queue.put({"mode": mode, "images_per_s": timer.rate(), "peak_rss_mb": peak_mb})


def _make_shards(root: Path, n: int) -> str:
    from dataeff.data.shard import ShardConfig, main
    from tests.fixtures import make_raw_tree

    raw = make_raw_tree(root / "raw", n=n, size=96)
    out = root / "shards" / "bench"
    main(ShardConfig(src=str(raw), out=str(out), workers=1, progress=False, samples_per_shard=64, min_side=8))
    return str(out)


def cpu_bench(args: argparse.Namespace) -> list[dict]:
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory() as tmp:
        shards = _make_shards(Path(tmp), args.images)
        rows = []
        for mode in ("memory", "stream"):
            queue = ctx.Queue()
            proc = ctx.Process(target=_run_cpu, args=(mode, args, shards, f"{tmp}/{mode}", queue))
            proc.start()
            proc.join()
            if proc.exitcode != 0 or queue.empty():
                raise RuntimeError(
                    f"benchmark mode '{mode}' failed (exit code {proc.exitcode}); see its traceback above"
                )
            rows.append(queue.get())
    return rows


def _model_flops_per_image(model, size: int) -> float:
    """Forward + backward FLOPs of one MAE training step, per image (matmuls/convs counted)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from dataeff.models.mae import mask_noise

    images = torch.randn(2, 3, size, size, device="cuda", dtype=torch.bfloat16)
    model = model.cuda().to(torch.bfloat16)
    with FlopCounterMode(display=False) as counter:
        loss = model(images, mask_noise(2, model.num_patches, 0))[0].mean()
        loss.backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops() / 2


def gpu_bench(args: argparse.Namespace) -> dict:
    import torch

    from dataeff.config import EncoderConfig, TrainerConfig, WandbConfig
    from dataeff.models.mae import MAE, MAEConfig, OptimConfig
    from dataeff.trainer import build_trainer

    name = torch.cuda.get_device_name(0)
    peak = args.peak_tflops or next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)
    enc = EncoderConfig(name="vit_base_patch16_224", img_size=224, allow_random_init=True)
    flops = _model_flops_per_image(MAE(enc, MAEConfig()), 224)
    model = MAE(enc, MAEConfig(), OptimConfig(warmup_steps=2), lr=1e-4, max_steps=args.gpu_steps)
    gen = torch.Generator().manual_seed(0)
    batches = [
        {"image": torch.randn(args.gpu_batch, 3, 224, 224, generator=gen), "key": [""] * args.gpu_batch}
        for _ in range(4)
    ]
    timer = _StepTimer(warmup=5)
    with tempfile.TemporaryDirectory() as tmp:
        trainer, info = build_trainer(
            TrainerConfig(
                max_steps=args.gpu_steps, checkpoint_every_n_steps=10**6, progress_bar=False, log_every_n_steps=50
            ),
            tmp,
            WandbConfig(enabled=False),
            "bench",
            {},
            extra_callbacks=[timer.callback],
            micro_batch_size=args.gpu_batch,
            use_distributed_sampler=False,
        )
        torch.cuda.reset_peak_memory_stats()
        trainer.fit(model, train_dataloaders=_memory_loader(batches, args.gpu_steps))
    rate = timer.rate()
    return {
        "device": name,
        "strategy": info["strategy"],
        "precision": info["precision"],
        "images_per_s": rate,
        "tflops": rate * flops / 1e12,
        "mfu": (rate * flops / 1e12 / peak) if peak else None,
        "peak_gpu_gb": torch.cuda.max_memory_allocated() / 2**30,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--steps", type=int, default=30, help="CPU optimiser steps per mode (3 warm-up steps not timed)"
    )
    parser.add_argument("--images", type=int, default=256, help="images in the benchmark shard set")
    parser.add_argument("--batch", type=int, default=32, help="CPU batch size")
    parser.add_argument("--workers", type=int, default=1, help="loader workers when streaming")
    parser.add_argument(
        "--threads", type=int, default=max(1, (os.cpu_count() or 2) - 1), help="torch threads for the model"
    )
    parser.add_argument("--gpu-steps", type=int, default=60)
    parser.add_argument("--gpu-batch", type=int, default=128, help="per-GPU batch for the ViT-B/16 run")
    parser.add_argument("--peak-tflops", type=float, default=0.0, help="device bf16 peak, if not in the built-in table")
    args = parser.parse_args()

    rows = cpu_bench(args)
    mem, stream = rows
    print("\n### MAE pre-training throughput, vit_tiny/16 @ 64 px, CPU\n")
    print("| feed | images/s | peak RSS (MB) | vs in-memory |")
    print("|---|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['mode']} | {r['images_per_s']:.1f} | {r['peak_rss_mb']:.0f} | {r['images_per_s'] / mem['images_per_s']:.2f} |"
        )
    verdict = "meets" if stream["images_per_s"] >= 0.9 * mem["images_per_s"] else "misses"
    print(
        f"\nstreaming {verdict} the >= 0.90 target ({stream['images_per_s'] / mem['images_per_s']:.2f} of in-memory; "
        f"batch {args.batch}, {args.workers} worker(s), {args.threads} torch thread(s))"
    )

    import torch

    print("\n### MAE pre-training, vit_base/16 @ 224 px, DeepSpeed ZeRO-2 bf16\n")
    if not torch.cuda.is_available():
        print("no GPU: CUDA is not available on this machine, GPU benchmark skipped")
        return
    g = gpu_bench(args)
    mfu = f"{g['mfu']:.1%}" if g["mfu"] is not None else "n/a (pass --peak-tflops)"
    print("| device | strategy | images/s | model TFLOP/s | MFU | peak GPU mem (GB) | vs 40 % MFU target |")
    print("|---|---|---:|---:|---:|---:|---:|")
    target = f"{g['mfu'] / 0.4:.2f}" if g["mfu"] is not None else "n/a"
    print(
        f"| {g['device']} | {g['strategy']} {g['precision']} | {g['images_per_s']:.0f} | {g['tflops']:.1f} | {mfu} | {g['peak_gpu_gb']:.1f} | {target} |"
    )
    print(json.dumps(g))


if __name__ == "__main__":
    main()
