#!/usr/bin/env bash
# Submit one dataeff stage as a SLURM job with the settings of launch/slurm/config.sh;
# prints the job id (sbatch --parsable).
#
# usage: launch/slurm/submit.sh [--sbatch-option=value ...] <stage> [config.yaml] [key=value ...]
#
#   launch/slurm/submit.sh pretrain configs/pretrain/base.yaml data.selection=selections/meddel-0.3
#   NODES=4 launch/slurm/submit.sh --dependency=afterok:1234 embed configs/embed/base.yaml
#
# Leading --options go to sbatch after those of config.sh, so they win; the rest goes to
# 'dataeff <stage>'. Paths are relative to the repository root, where the job runs.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
# shellcheck source=launch/slurm/config.sh
source launch/slurm/config.sh

sbatch_args=()
while [[ "${1:-}" == --* ]]; do
  sbatch_args+=("$1")
  shift
done
stage="${1:-}"
if [[ ! -f "launch/slurm/$stage.sbatch" ]]; then
  echo "usage: launch/slurm/submit.sh [--sbatch-option=value ...] <stage> [config.yaml] [key=value ...]" >&2
  echo "stages: embed select pretrain finetune sweep report (launch/slurm/<stage>.sbatch)" >&2
  exit 2
fi
shift
options="SBATCH_${stage^^}[@]"
mkdir -p "$LOG_DIR"
exec sbatch --parsable --chdir="$PWD" "${SBATCH_COMMON[@]}" "${!options}" "${sbatch_args[@]}" \
  "launch/slurm/$stage.sbatch" "$@"
