#!/bin/bash
# One run of a norm-position sweep, as a task of the job array that tools/compare_norms.py submits:
#
#   python tools/compare_norms.py --launcher slurm --sbatch-args "--nodes=1 --gpus-per-node=8" ...
#     -> sbatch --array=0-(N-1)[%K] --export=ALL,MIXLN_TASK_DIR=OUT/slurm,ROOT=REPO slurm/compare_norms_task.sh
#
# Task i sources OUT/slurm/task_<i>.env (TRAINER_ARGS_FILE=OUT/slurm/task_<i>.args, the run's whole trainer
# command line, plus TRAIN_DATA, VALID_DATA, TOKENIZER, CKPT, NORM_POSITION, TRAIN_ITERS) and replaces itself
# with slurm/pretrain_7b_mixln.sh, so the script's checks, USR1 trap, save-and-requeue and resume work per
# task while the run trains exactly what --launcher local would.
#
#SBATCH --job-name=mixln-compare
#SBATCH --signal=B:USR1@120
#SBATCH --requeue
#SBATCH --open-mode=append
set -euo pipefail
: "${MIXLN_TASK_DIR:?set by tools/compare_norms.py (--export=ALL,MIXLN_TASK_DIR=...)}"
: "${SLURM_ARRAY_TASK_ID:?not a job-array task: submit with tools/compare_norms.py --launcher slurm}"
ROOT="${ROOT:-${SLURM_SUBMIT_DIR:-$(pwd)}}"
TASK="$MIXLN_TASK_DIR/task_${SLURM_ARRAY_TASK_ID}.env"
if [ ! -f "$TASK" ]; then
    echo "compare_norms_task.sh: $TASK does not exist (was the sweep directory moved?)" >&2
    exit 2
fi
# shellcheck disable=SC1090
source "$TASK"
export ROOT
echo "[$(date)] array task $SLURM_ARRAY_TASK_ID: $(head -n 1 "$TASK" | sed 's/^# //')"
exec bash "${PRETRAIN_SCRIPT:-$ROOT/slurm/pretrain_7b_mixln.sh}"
