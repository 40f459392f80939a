#!/bin/bash
# LLaMA-7B with Mix-LN (first 2 of 32 layers Post-LN), the paper's recipe as advised for 7B:
# lr 5e-4, ~10% warm-up, cosine to 0.1x, Adam without weight decay, batch 512 x 256 tokens, bf16,
# ZeRO-3. Multi-node A100/H100 (8 GPUs per node).
#
#   mkdir -p logs                                      # Slurm opens --output before the script runs
#   sbatch slurm/pretrain_7b_mixln.sh                  # 4 nodes x 8 GPUs
#   sbatch --nodes 8 slurm/pretrain_7b_mixln.sh
#   DATA=/data/c4_t5 TOKENIZER=/data/t5/spiece.model CKPT=/ckpt/7b-mixln sbatch slurm/pretrain_7b_mixln.sh
#
# Preemption: Slurm sends SIGUSR1 to this script 120 s before the time limit (--signal=B:USR1@120).
# The trap forwards it to every training process; they finish the current step, save a checkpoint
# and exit 0; the job then requeues itself and resumes from that checkpoint (--load is passed only
# when CKPT holds one).
#
# LAUNCHER=srun (default): srun starts one python per GPU directly (the trainer reads SLURM_PROCID/
#   SLURM_LOCALID/SLURM_NTASKS), so srun's signal forwarding reaches the trainers. (torchrun would
#   not forward SIGUSR1, and kills its workers 30 s after a SIGTERM -- too short to save 7B states.)
# LAUNCHER=deepspeed: DeepSpeed's launcher over a hostfile generated from the allocation (needs
#   passwordless ssh/pdsh between nodes); USR1 is then delivered to the trainers by a small srun step
#   (to the trainers only: DeepSpeed's launcher processes have no USR1 handler and would die of it).
#
#SBATCH --job-name=mixln-7b
#SBATCH --nodes=4
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=12
#SBATCH --mem=0
#SBATCH --exclusive
#SBATCH --time=48:00:00
#SBATCH --signal=B:USR1@120
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=logs/%x-%j.out

set -euo pipefail
ROOT="${ROOT:-${SLURM_SUBMIT_DIR:-$(pwd)}}"
cd "$ROOT"
PY="${VENV:-$ROOT/.venv}/bin/python"
[ -x "$PY" ] || { echo "pretrain_7b_mixln.sh: no Python environment at ${VENV:-$ROOT/.venv}; install your CUDA" \
    "torch into it and run 'bash launchers/setup_env.sh', or set VENV=/path/to/venv" >&2; exit 2; }
LAUNCHER="${LAUNCHER:-srun}"
DATA="${DATA:-$ROOT/data/c4_t5}"                   # preprocess_c4.py outputs: ${DATA}_{train,valid}_text_document
TOKENIZER="${TOKENIZER:-$ROOT/data/t5/spiece.model}"
CKPT="${CKPT:-$ROOT/checkpoints/7b-mixln}"
TRAIN_ITERS="${TRAIN_ITERS:-150000}"               # the paper planned 150K (its run stopped at 13K)
GPUS_PER_NODE="${SLURM_GPUS_ON_NODE:-8}"
mkdir -p logs "$CKPT"

export MASTER_ADDR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"
export MASTER_PORT="${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-8}" TOKENIZERS_PARALLELISM=false
export WANDB_MODE="${WANDB_MODE:-offline}"
export SRUN_CPUS_PER_TASK="${SLURM_CPUS_PER_TASK:-12}"  # srun >= 22.05 no longer inherits --cpus-per-task
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"

args=(
    --preset 7b --norm-position mix --post-ln-layers 2
    --tokenizer "$TOKENIZER" --seq-length 256
    --data-path "${DATA}_train_text_document" --valid-data-path "${DATA}_valid_text_document"
    --micro-batch-size 8 --global-batch-size 512 --train-iters "$TRAIN_ITERS"
    --optimizer adam --lr 5e-4 --lr-warmup-fraction 0.1 --lr-decay-style cosine --clip-grad 1.0
    --bf16 --deepspeed-config ds_configs/zero3.json --recompute-activations
    --eval-interval 1000 --eval-iters 40 --log-interval 10 --grad-norm-interval 100
    --save "$CKPT" --save-interval 1000 --keep-last 3
    --wandb-project "${WANDB_PROJECT:-mixln}" --wandb-name "7b-mixln-k2-${SLURM_JOB_ID}"
)
[ -f "$CKPT/latest" ] && args+=(--load "$CKPT")
echo "[$(date)] job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}): $SLURM_NNODES nodes x $GPUS_PER_NODE GPUs," \
     "master $MASTER_ADDR:$MASTER_PORT, resume: $(cat "$CKPT/latest" 2>/dev/null || echo none)"

if [ "$LAUNCHER" = srun ]; then
    srun --kill-on-bad-exit=1 --cpu-bind=none "$PY" -m megatron_mixln.pretrain "${args[@]}" &
    forward_usr1() { trapped=1; echo "[$(date)] SIGUSR1: asking the trainers to save and exit"; kill -USR1 "$TRAIN_PID" || true; }
else
    HOSTFILE="$CKPT/hostfile.$SLURM_JOB_ID"
    scontrol show hostnames "$SLURM_JOB_NODELIST" | sed "s/\$/ slots=$GPUS_PER_NODE/" > "$HOSTFILE"
    "$PY" -m deepspeed.launcher.runner --hostfile "$HOSTFILE" --num_nodes "$SLURM_NNODES" \
        --num_gpus "$GPUS_PER_NODE" --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" \
        --module megatron_mixln.pretrain "${args[@]}" &
    forward_usr1() {
        trapped=1
        echo "[$(date)] SIGUSR1: asking the trainers to save and exit"
        # One task per node signals this job's trainers there (they were started by the launcher, not srun):
        # `python -u -m megatron_mixln.pretrain`, not the launcher's `--module megatron_mixln.pretrain`.
        # The task counts are explicit: srun would otherwise take the job's SLURM_NTASKS.
        srun --overlap --nodes="$SLURM_NNODES" --ntasks="$SLURM_NNODES" --ntasks-per-node=1 \
            bash -c 'pkill -USR1 -u "$(id -u)" -f "[-]m megatron_mixln[.]pretrain"' || true
    }
fi
TRAIN_PID=$!
trap forward_usr1 USR1
# `wait` returns early when the trap fires; then wait again for the trainers to save and exit
# (bash keeps a finished child's status, so the second wait returns the real exit code).
while :; do
    trapped=0 status=0
    wait "$TRAIN_PID" || status=$?
    [ "$trapped" = 1 ] || break
done

latest="$(cat "$CKPT/latest" 2>/dev/null || echo none)"
echo "[$(date)] trainers exited with $status; latest checkpoint: $latest"
if [ "$status" = 0 ] && [ "$latest" != "$(printf 'iter_%07d' "$TRAIN_ITERS")" ]; then
    echo "[$(date)] not finished: requeueing job $SLURM_JOB_ID to resume from $latest"
    scontrol requeue "$SLURM_JOB_ID"
fi
exit "$status"
