#!/bin/bash
# LLaMA-7B with Mix-LN (first 2 of 32 layers Post-LN), the paper's recipe as advised for 7B
# (docs/paper.md#training-recipe): lr 5e-4, 15K warm-up (the paper: 10K-15K), cosine to 0.1x over the planned
# 150K steps (its run stopped at 13K), Adam without weight decay, batch 512 x 256 tokens, bf16, ZeRO-3,
# activation recomputation. 4 nodes x 8 GPUs (A100/H100 80GB): micro-batch 8 x 32 GPUs x 2 = 512.
#
#   mkdir -p logs                                      # Slurm opens --output before the script runs
#   sbatch slurm/pretrain_7b_mixln.sh                  # 4 nodes x 8 GPUs
#   sbatch --nodes 8 slurm/pretrain_7b_mixln.sh        # (then MICRO_BATCH=8 gives no accumulation)
#   DATA=/data/c4_t5 TOKENIZER=/data/t5/spiece.model CKPT=/ckpt/7b-mixln sbatch slurm/pretrain_7b_mixln.sh
#   LAUNCHER=deepspeed sbatch slurm/pretrain_7b_mixln.sh    # DeepSpeed's launcher, no ssh needed
#
# Every size, placement and path is an environment variable (PRESET, NORM_POSITION, POST_LN_LAYERS,
# TRAIN_ITERS, LR, WARMUP_ITERS, MICRO_BATCH, DATA, TOKENIZER, CKPT, DS_CONFIG, EXTRA_ARGS, LAUNCHER,
# MASTER_ADDR, ...): the defaults below, then slurm/job_body.sh's, whose header lists them all.
# Submit from the repository root (or set ROOT).
#
# Preemption: Slurm sends SIGUSR1 to this script 120 s before the time limit (--signal=B:USR1@120).
# It is forwarded to the training processes; they finish the current step, save a checkpoint and exit
# 0; the job then requeues itself and resumes from that checkpoint (--load is passed only when CKPT
# holds one).
# LAUNCHER=srun (default): srun starts one python per GPU (the trainer reads SLURM_PROCID/
#   SLURM_LOCALID/SLURM_NTASKS). (torchrun would not forward SIGUSR1, and kills its workers 30 s after
#   a SIGTERM -- too short to save 7B states.)
# LAUNCHER=deepspeed: srun starts DeepSpeed's launcher once per node (`--no_ssh --node_rank`), which
#   starts the trainers there. The signal goes to the trainers only (the launcher would die of it).
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

: "${PRESET:=7b}" "${POST_LN_LAYERS=2}" "${LR:=5e-4}" "${TRAIN_ITERS:=150000}" "${WARMUP_ITERS:=15000}"
: "${MICRO_BATCH:=8}" "${DS_CONFIG:=ds_configs/zero3.json}" "${RECOMPUTE:=1}"
body="${ROOT:-${SLURM_SUBMIT_DIR:-$(pwd)}}/slurm/job_body.sh"
[ -f "$body" ] || { echo "pretrain_7b_mixln.sh: error: $body not found: submit from the repository root or set ROOT" >&2; exit 2; }
source "$body"
