#!/usr/bin/env bash
# Submit a sweep as one SLURM job per (method, ratio) cell, then a report job.
#
# usage: launch/slurm/sweep.sh [--sbatch-option=value ...] <sweep.yaml> [key=value ...]
#
# Each cell job runs 'dataeff sweep' restricted to its cell (methods=[m] ratios=[r]):
# select -> pretrain -> finetune in order, resuming from cell.json when requeued. The
# first cell's job also bootstraps and embeds the pool, which every cell shares, so the
# other cells depend on it (afterok) and then run side by side; 'dataeff report' runs
# when all cells have ended (afterany: a failed cell leaves a gap in the table, not no
# table). Cells come from the sweep's own planner (full at 1.0 only, unavailable methods
# left out), so this script submits exactly what 'dataeff sweep' would run. Prints one
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
submit() {  # submit <job name> <dependency or ""> <stage> [args ...]: prints the job id
  local name="$1" after="$2" stage="$3"
  shift 3
  local options="SBATCH_${stage^^}[@]"
  sbatch --parsable --chdir="$PWD" "${SBATCH_COMMON[@]}" "${!options}" --job-name="$name" \
    ${after:+"--dependency=$after"} "${sbatch_args[@]}" "launch/slurm/$stage.sbatch" "$@"
}

first="" cell_ids=""
while read -r kind a b c; do
  [[ "$kind" == cell ]] || continue
  id="$(submit "dataeff-sweep-$c" "${first:+afterok:$first}" sweep "$config" "$@" "methods=[$a]" "ratios=[$b]")"
  echo "$id dataeff-sweep-$c"
  first="${first:-$id}"
  cell_ids+=":$id"
done <<< "$plan"

read -r -a report_args <<< "$(grep '^report ' <<< "$plan")"
id="$(submit "dataeff-sweep-report" "afterany$cell_ids" report "${report_args[@]:1}")"
echo "$id dataeff-sweep-report"
