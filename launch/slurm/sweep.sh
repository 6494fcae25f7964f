#!/usr/bin/env bash
# Submit a sweep as SLURM jobs: one per stage of each (method, ratio) cell, then a report.
#
# usage: launch/slurm/sweep.sh [--sbatch-option=value ...] <sweep.yaml> [key=value ...]
#
# Every job runs 'dataeff sweep' restricted to one stage of one cell
# (methods=[m] ratios=[r] stages=[s] report=false), with that stage's resources and time
# limit from config.sh, and resumes where it left off when requeued:
#   dataeff-sweep-embed                 bootstrap encoder + pool embedding, shared by all cells
#   dataeff-sweep-<cell>-select         afterok: embed
#   dataeff-sweep-<cell>-pretrain       afterok: the cell's select
#   dataeff-sweep-<cell>-finetune       afterok: the cell's pretrain
#   dataeff-sweep-report                afterany: every finetune job (a failed cell leaves a
#                                       gap in the table, not no table)
# Cells come from the sweep's own planner (full at 1.0 only, unavailable methods left out),
# so this script submits exactly what 'dataeff sweep' would run. Prints one
# "<job id> <job name>" line per job. Settings: launch/slurm/config.sh.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
# shellcheck source=launch/slurm/config.sh
source launch/slurm/config.sh

sbatch_args=()
while [[ "${1:-}" == --* ]]; do
  sbatch_args+=("$1")
  shift
done
if [[ $# -lt 1 ]]; then
  echo "usage: launch/slurm/sweep.sh [--sbatch-option=value ...] <sweep.yaml> [key=value ...]" >&2
  exit 2
fi
config="$1"
shift

# The sweep's own planner: "cell <method> <ratio> <cell name>" per cell, then
# "report <key=value ...>" with the arguments of the final report.
plan="$("$PYTHON" -c '
import sys
from dataeff.config import ConfigError, load_config
from dataeff.sweep import SweepConfig, plan_cells, unavailable_methods
try:
    cfg = load_config(SweepConfig, sys.argv[1], sys.argv[2:])
except ConfigError as exc:
    sys.exit(f"launch/slurm/sweep.sh: error: {exc}")
for c in plan_cells(list(cfg.methods), list(cfg.ratios), unavailable_methods(cfg))[0]:
    print("cell", c.method, repr(c.ratio), c.name)
w = cfg.wandb
print("report", f"run={cfg.out}", f"alpha={cfg.alpha}", f"wandb.enabled={w.enabled}",
      f"wandb.project={w.project}", f"wandb.group={w.group or cfg.sweep_name}")
' "$config" "$@")"

mkdir -p "$LOG_DIR"
submit() {  # submit <job name> <dependency or ""> <resources: a stage of config.sh> <stage> [args ...]
  local name="$1" after="$2" options="SBATCH_${3^^}[@]" stage="$4"
  shift 4
  sbatch --parsable --chdir="$PWD" "${SBATCH_COMMON[@]}" "${!options}" --job-name="$name" \
    ${after:+"--dependency=$after"} "${sbatch_args[@]}" "launch/slurm/$stage.sbatch" "$@"
}

# The bootstrap is a short pre-training run: it gets the pretrain resources.
embed_id="$(submit dataeff-sweep-embed "" pretrain sweep "$config" "$@" "stages=[embed]" report=false)"
echo "$embed_id dataeff-sweep-embed"
finetune_ids=""
while read -r kind method ratio cell; do
  [[ "$kind" == cell ]] || continue
  after="afterok:$embed_id"
  for stage in select pretrain finetune; do
    id="$(submit "dataeff-sweep-$cell-$stage" "$after" "$stage" sweep "$config" "$@" \
      "methods=[$method]" "ratios=[$ratio]" "stages=[$stage]" report=false)"
    echo "$id dataeff-sweep-$cell-$stage"
    after="afterok:$id"
  done
  finetune_ids+=":$id"
done <<< "$plan"

read -r -a report_args <<< "$(grep '^report ' <<< "$plan")"
id="$(submit dataeff-sweep-report "afterany$finetune_ids" report report "${report_args[@]:1}")"
echo "$id dataeff-sweep-report"
