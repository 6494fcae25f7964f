#!/usr/bin/env bash
# Submit a sweep as SLURM jobs: one job chain per (cell, seed) unit, then a report.
#
# usage: launch/slurm/sweep.sh [--sbatch-option=value ...] <sweep.yaml> [key=value ...]
#
# Every job runs 'dataeff sweep' restricted to one stage of one unit
# (methods=[m] ratios=[r] seeds=[k] stages=[s] report=false), with that stage's resources
# and time limit from config.sh, and resumes where it left off when requeued:
#   dataeff-sweep-embed                       bootstrap encoder, pool embedding and leakage
#                                             check, shared by every cell and seed
#   dataeff-sweep-<cell>-s<k>-select          afterok: embed
#   dataeff-sweep-<cell>-s<k>-pretrain        afterok: the unit's select
#   dataeff-sweep-<cell>-s<k>-finetune        afterok: the unit's pretrain
#   dataeff-sweep-scratch-s<k>-finetune       no dependency (random encoder: needs no pool)
#   dataeff-sweep-report                      afterany: every finetune job (a failed unit
#                                             leaves a gap in the table, not no table)
# Units come from the sweep's own planner (dataeff.sweep_plan.slurm_jobs: full at 1.0 only,
# unavailable methods left out, every cell once per seed), so this script submits exactly
# what 'dataeff sweep' would run. Prints one "<job id> <job name>" line per job.
# All or nothing: if sbatch refuses one job (a resource the partition cannot give, a bad
# option), the jobs submitted before it are cancelled, nothing is printed on stdout and
# the script exits 1 with sbatch's reason and the job it refused.
# Settings: launch/slurm/config.sh (every value can be set from the environment).
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

# The sweep's own planner: "unit <name> <stages> <key=value ...>" per (cell, seed), then
# "report <key=value ...>" with the arguments of the final report.
plan="$("$PYTHON" -c '
import sys
from dataeff.cli import load_stage_config
from dataeff.config import ConfigError
from dataeff.sweep_plan import SweepConfig, slurm_jobs
try:
    cfg = load_stage_config(SweepConfig, sys.argv[1], sys.argv[2:])
except ConfigError as exc:
    sys.exit(f"launch/slurm/sweep.sh: error: {exc}")
print("\n".join(slurm_jobs(cfg)))
' "$config" "$@")"

mkdir -p "$LOG_DIR"
submitted=()  # "<job id> <job name>" per job, printed once every job is in
cancel_submitted() {  # on any early exit: take back what was submitted
  [[ ${#submitted[@]} -gt 0 ]] || return 0
  local ids=("${submitted[@]%% *}")
  echo "launch/slurm/sweep.sh: cancelling the ${#ids[@]} job(s) already submitted: ${ids[*]}" >&2
  scancel "${ids[@]}" || echo "launch/slurm/sweep.sh: error: scancel failed; cancel jobs ${ids[*]} by hand" >&2
}
trap cancel_submitted EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

job_id=""
submit() {  # submit <job name> <dependency or ""> <resources: a stage of config.sh> <stage> [args ...]; sets job_id
  local name="$1" after="$2" resources="SBATCH_${3^^}" stage="$4"
  local options="${resources}[@]"
  shift 4
  if ! job_id="$(sbatch --parsable --chdir="$PWD" "${SBATCH_COMMON[@]}" "${!options}" --job-name="$name" \
    ${after:+"--dependency=$after"} "${sbatch_args[@]}" "launch/slurm/$stage.sbatch" "$@")"; then
    echo "launch/slurm/sweep.sh: error: sbatch refused job $name (above: its reason; its resources:" \
      "SBATCH_COMMON and $resources in launch/slurm/config.sh, each value settable from the environment)" >&2
    exit 1
  fi
  job_id="${job_id%%;*}"  # --parsable prints "<id>;<cluster>" on multi-cluster sites
  submitted+=("$job_id $name")
}

# The bootstrap is a short pre-training run: it gets the pretrain resources.
submit dataeff-sweep-embed "" pretrain sweep "$config" "$@" "stages=[embed]" report=false
embed_id="$job_id"
finetune_ids=""
while read -r kind name stages keys; do
  [[ "$kind" == unit ]] || continue
  read -r -a unit_args <<< "$keys"
  after=""
  [[ "$stages" == select,* ]] && after="afterok:$embed_id"
  for stage in ${stages//,/ }; do
    submit "dataeff-sweep-$name-$stage" "$after" "$stage" sweep "$config" "$@" \
      "${unit_args[@]}" "stages=[$stage]" report=false
    after="afterok:$job_id"
  done
  finetune_ids+=":$job_id"
done <<< "$plan"

read -r -a report_args <<< "$(grep '^report ' <<< "$plan")"
submit dataeff-sweep-report "afterany$finetune_ids" report report "${report_args[@]:1}"
trap - EXIT
printf '%s\n' "${submitted[@]}"
