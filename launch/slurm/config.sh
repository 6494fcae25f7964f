# shellcheck shell=bash disable=SC2034  # the SBATCH_* arrays are read by submit.sh and sweep.sh
# Cluster settings for every launch/slurm script: edit them here, in one place.
#
# #SBATCH lines cannot read a file, so the .sbatch scripts carry only what never changes
# (job name, log file, requeue, signal); launch/slurm/submit.sh and launch/slurm/sweep.sh
# read the arrays below and pass them to sbatch on its command line, where they win over
# any #SBATCH line. Every value below can also be set from the environment for one
# submission; nothing in the arrays is fixed:
#   NODES=4 TIME_PRETRAIN=48:00:00 launch/slurm/submit.sh pretrain configs/pretrain/base.yaml
#   MEM_REPORT=2G launch/slurm/sweep.sh configs/sweep/ratios.yaml ...
# The running jobs source this file too, for PYTHON and the exported variables.

PARTITION="${PARTITION:-gpu}"          # sbatch --partition
ACCOUNT="${ACCOUNT:-}"                 # sbatch --account (empty: your default account)
QOS="${QOS:-}"                         # sbatch --qos (empty: the partition's default)
NODES="${NODES:-1}"                    # nodes for the multi-node stages (embed, select, pretrain, sweep)
GPUS_PER_NODE="${GPUS_PER_NODE:-4}"    # GPUs requested on each node
TASKS_PER_NODE="${TASKS_PER_NODE:-$GPUS_PER_NODE}"  # ranks per node: one per GPU
CPUS_PER_TASK="${CPUS_PER_TASK:-8}"    # cores per rank (dataloader workers + decoding)
MEM_PER_NODE="${MEM_PER_NODE:-0}"      # sbatch --mem; 0 = all the memory of the node
NODES_FINETUNE="${NODES_FINETUNE:-1}"  # fine-tuning a segmentation head is small: one node
CPUS_REPORT="${CPUS_REPORT:-2}"        # the report: one CPU task, no GPU
MEM_REPORT="${MEM_REPORT:-8G}"         # sbatch --mem of the report job
TIME_EMBED="${TIME_EMBED:-02:00:00}"   # wall-clock limits per stage (HH:MM:SS or D-HH:MM:SS)
TIME_SELECT="${TIME_SELECT:-02:00:00}"
TIME_PRETRAIN="${TIME_PRETRAIN:-24:00:00}"
TIME_FINETUNE="${TIME_FINETUNE:-04:00:00}"
TIME_REPORT="${TIME_REPORT:-00:30:00}"
TIME_SWEEP="${TIME_SWEEP:-3-00:00:00}"
LOG_DIR="${LOG_DIR:-logs/slurm}"       # one log per job: <LOG_DIR>/<job name>-<job id>.out

# Options shared by every job, then one array per stage (later options win).
SBATCH_COMMON=(
  --partition="$PARTITION"
  ${ACCOUNT:+"--account=$ACCOUNT"}
  ${QOS:+"--qos=$QOS"}
  --output="$LOG_DIR/%x-%j.out"
)
SBATCH_GPU=(
  --nodes="$NODES"
  --ntasks-per-node="$TASKS_PER_NODE"
  --gpus-per-node="$GPUS_PER_NODE"
  --cpus-per-task="$CPUS_PER_TASK"
  --mem="$MEM_PER_NODE"
)
SBATCH_EMBED=("${SBATCH_GPU[@]}" --time="$TIME_EMBED")
SBATCH_SELECT=("${SBATCH_GPU[@]}" --time="$TIME_SELECT")
SBATCH_PRETRAIN=("${SBATCH_GPU[@]}" --time="$TIME_PRETRAIN")
SBATCH_FINETUNE=("${SBATCH_GPU[@]}" --nodes="$NODES_FINETUNE" --time="$TIME_FINETUNE")
# The report only reads result files: one process ('dataeff report' is not distributed).
SBATCH_REPORT=(--nodes=1 --ntasks=1 --cpus-per-task="$CPUS_REPORT" --mem="$MEM_REPORT" --time="$TIME_REPORT")
SBATCH_SWEEP=("${SBATCH_GPU[@]}" --time="$TIME_SWEEP")

# What the jobs run with (read inside the allocation).
PYTHON="${PYTHON:-.venv/bin/python}"   # interpreter with dataeff installed, relative to the repo root
export DATAEFF_DIST_TIMEOUT="${DATAEFF_DIST_TIMEOUT:-1800}"  # s before ranks give up on a dead peer
export WANDB_MODE="${WANDB_MODE:-offline}"                   # 'online' to sync; the key comes from WANDB_API_KEY
# Site setup, if your cluster needs it (modules, conda):
# module load cuda/12.4
