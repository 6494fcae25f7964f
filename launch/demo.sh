#!/usr/bin/env bash
# `make demo`: the whole pipeline on the demo data shipped in data/kvasir-seg, on CPU.
#
#   demo data (demo/) -> shards (shards/demo-pool) -> sweep: bootstrap MAE encoder, embed,
#   leakage check, then per (cell, seed): select (full / random / MedDEL / SemDeDup / OptiDEL),
#   pre-train, fine-tune, plus scratch (no pre-training) per seed -> report with 95% intervals
#
# usage: bash launch/demo.sh [key=value ...]   (extra keys go to the sweep, e.g.
#        select.sam.checkpoint=<sam_vit_b.pth> select.sam.model=vit_b for OptiDEL with a real SAM)
#        SWEEP_CONFIG=configs/sweep/fidelity.yaml bash launch/demo.sh   (`make fidelity`: the same
#        pool and downstream split, the fidelity protocol of docs/fidelity.md)
# Every step skips what is already done, so a rerun resumes. The sweep prints where
# runs/demo/report.md, report.csv and plots/ are. W&B stays offline unless WANDB_MODE is set.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export WANDB_MODE="${WANDB_MODE:-offline}"

dataeff demo-data --config configs/demo-data.yaml
dataeff shard --config configs/shard/tiny.yaml src=demo/pool out=shards/demo-pool
dataeff sweep --config "${SWEEP_CONFIG:-configs/sweep/demo.yaml}" "$@"
