#!/bin/bash
# LLaMA-71M with Mix-LN, the paper's recipe (docs/paper.md#training-recipe): lr 1e-3, 10K steps, 1K warm-up, k = 3 of 12 layers Post-LN.
# Adam without weight decay, batch 512 x 256 tokens, cosine to 0.1 x lr, bf16, C4 + T5 tokenizer.
# 1 node x 8 GPUs: micro-batch 64 x 8 GPUs x 1 accumulation = 512; DeepSpeed ZeRO-1.
#
#   mkdir -p logs                                      # Slurm opens --output before the script runs
#   sbatch slurm/pretrain_71m_mixln.sh
#   NORM_POSITION=pre sbatch slurm/pretrain_71m_mixln.sh       # the Pre-LN baseline
#   NORM_POSITIONS=pre,post,mix sbatch --array=0-2 slurm/pretrain_71m_mixln.sh
#
# Every value is an environment variable (the defaults below, then slurm/job_body.sh's): see its
# header or docs/slurm.md. Submit from the repository root (or set ROOT).
#
#SBATCH --job-name=mixln-71m
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=12
#SBATCH --mem=0
#SBATCH --exclusive
#SBATCH --time=24:00:00
#SBATCH --signal=B:USR1@120
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=logs/%x-%j.out

: "${PRESET:=71m}" "${POST_LN_LAYERS=3}" "${LR:=1e-3}" "${TRAIN_ITERS:=10000}" "${WARMUP_ITERS:=1000}"
: "${MICRO_BATCH:=64}" "${DS_CONFIG:=ds_configs/zero1.json}"
body="${ROOT:-${SLURM_SUBMIT_DIR:-$(pwd)}}/slurm/job_body.sh"
[ -f "$body" ] || { echo "pretrain_71m_mixln.sh: error: $body not found: submit from the repository root or set ROOT" >&2; exit 2; }
source "$body"
