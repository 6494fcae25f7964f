#!/usr/bin/env bash
# Run one dataeff stage under torchrun: one process per GPU of this node (gloo CPU
# processes when there is no GPU), on one node or on several.
#
# usage: launch/torchrun.sh [--torchrun-option=value ...] <stage> [config.yaml] [key=value ...]
#
#   launch/torchrun.sh embed configs/embed/tiny.yaml out=embeddings/demo
#   NPROC_PER_NODE=2 launch/torchrun.sh select configs/select/tiny.yaml
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=node0 launch/torchrun.sh pretrain configs/pretrain/base.yaml   # on node0
#   NNODES=2 NODE_RANK=1 MASTER_ADDR=node0 launch/torchrun.sh pretrain configs/pretrain/base.yaml   # on node1
#
# Environment (all optional):
#   NPROC_PER_NODE  processes on this node          (default: GPUs visible here, 1 without one)
#   NNODES          nodes taking part               (default: 1)
#   NODE_RANK       this node's index 0..NNODES-1   (default: 0)
#   MASTER_ADDR     host name/IP of node 0          (default: 127.0.0.1)
#   MASTER_PORT     free TCP port on node 0         (default: 29500)
#   RDZV_ENDPOINT   host:port of a c10d rendezvous; when set, nodes join it instead of
#                   NODE_RANK/MASTER_* (node ranks are then assigned by the rendezvous)
#   RDZV_ID         job id shared by every node of one c10d rendezvous (default: dataeff)
#   PYTHON          interpreter with dataeff installed (default: .venv/bin/python of this
#                   checkout, else python3 on PATH)
#   DATAEFF_DIST_TIMEOUT  seconds before a collective waiting on a dead rank fails (default: 600)
#
# Leading --options go to torchrun and override the ones derived from the environment
# (write them as --name=value). The rest goes to 'dataeff <stage>' unchanged, except a
# bare *.yaml right after the stage, which becomes '--config <file>'.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-$(command -v "$root/.venv/bin/python" || command -v python3)}"

launcher_args=()
while [[ "${1:-}" == --* ]]; do
  launcher_args+=("$1")
  shift
done
if [[ $# -lt 1 ]]; then
  echo "usage: launch/torchrun.sh [--torchrun-option=value ...] <stage> [config.yaml] [key=value ...]" >&2
  exit 2
fi
stage="$1"
shift
case "${1:-}" in
  *.yaml | *.yml) set -- --config "$@" ;;
esac

if [[ -n "${RDZV_ENDPOINT:-}" ]]; then
  rendezvous=(--rdzv-backend=c10d --rdzv-endpoint="$RDZV_ENDPOINT" --rdzv-id="${RDZV_ID:-dataeff}")
else
  rendezvous=(--node-rank="${NODE_RANK:-0}" --master-addr="${MASTER_ADDR:-127.0.0.1}" --master-port="${MASTER_PORT:-29500}")
fi

exec "$PYTHON" -m torch.distributed.run \
  --nnodes="${NNODES:-1}" \
  --nproc-per-node="${NPROC_PER_NODE:-$("$PYTHON" -c 'import torch; print(torch.cuda.device_count() or 1)')}" \
  "${rendezvous[@]}" \
  "${launcher_args[@]}" \
  -m dataeff "$stage" "$@"
