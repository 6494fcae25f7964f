# shellcheck shell=bash
# The body of every launch/slurm/<stage>.sbatch: start one 'dataeff <stage>' rank per
# task with srun. Each rank reads its rank, world size and master (first node of the
# step, port from the job id) from SLURM's variables in dataeff/dist.py, so nothing is
# computed here. Sourced from the repository root (submit.sh submits with --chdir).
set -euo pipefail
# shellcheck source=launch/slurm/config.sh
source launch/slurm/config.sh

# run_stage <stage> [config.yaml] [key=value ...]
run_stage() {
  local stage="$1"
  shift
  case "${1:-}" in
    *.yaml | *.yml) set -- --config "$@" ;;
  esac
  # srun 22.05+ does not inherit --cpus-per-task from the allocation by itself.
  export SRUN_CPUS_PER_TASK="${SLURM_CPUS_PER_TASK:-1}"
  # Near the time limit SLURM signals this shell (--signal=B:USR1@...): requeue the job.
  # SLURM then stops the ranks with SIGTERM (training stages checkpoint on it) and runs
  # the job again under the same id; every stage resumes from what it left (embedding
  # parts, finished selections, pretrain's last checkpoint with resume=auto).
  # Pre-emption of a --requeue job takes the same SIGTERM-and-restart path.
  trap 'echo "dataeff: time limit near, requeueing job ${SLURM_JOB_ID}" >&2; scontrol requeue "${SLURM_JOB_ID}"' USR1
  echo "dataeff: job ${SLURM_JOB_ID:-?} (restart ${SLURM_RESTART_COUNT:-0}) on ${SLURM_JOB_NODELIST:-?}: dataeff $stage $*" >&2
  # In the background, so that bash runs the trap as soon as the signal arrives.
  srun --kill-on-bad-exit=1 "$PYTHON" -m dataeff "$stage" "$@" &
  wait $!
}
