#!/bin/bash
# LLaMA-350M with Mix-LN. Not in the Mix-LN paper's table (docs/paper.md#training-recipe): the LayerNorm-Scaling
# paper's 350M recipe (its run_350m.sh), as configs/paper/350m.yaml: k = 6 of 24 layers Post-LN, lr 5e-4,
# 60K steps, 6K warm-up.
# Adam without weight decay, batch 512 x 256 tokens, cosine to 0.1 x lr, bf16, C4 + T5 tokenizer.
# 1 node x 8 GPUs: micro-batch 32 x 8 GPUs x 2 accumulation = 512; DeepSpeed ZeRO-1.
#
#   mkdir -p logs                                      # Slurm opens --output before the script runs
#   sbatch slurm/pretrain_350m_mixln.sh
#   NORM_POSITION=pre sbatch slurm/pretrain_350m_mixln.sh       # the Pre-LN baseline
#   NORM_POSITIONS=pre,post,mix sbatch --array=0-2 slurm/pretrain_350m_mixln.sh
#
# Every value is an environment variable (the defaults below, then slurm/job_body.sh's): see its
# header or docs/slurm.md. Submit from the repository root (or set ROOT).
#
#SBATCH --job-name=mixln-350m
#SBATCH --nodes=1
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

: "${PRESET:=350m}" "${POST_LN_LAYERS=6}" "${LR:=5e-4}" "${TRAIN_ITERS:=60000}" "${WARMUP_ITERS:=6000}"
: "${MICRO_BATCH:=32}" "${DS_CONFIG:=ds_configs/zero1.json}"
body="${ROOT:-${SLURM_SUBMIT_DIR:-$(pwd)}}/slurm/job_body.sh"
[ -f "$body" ] || { echo "pretrain_350m_mixln.sh: error: $body not found: submit from the repository root or set ROOT" >&2; exit 2; }
source "$body"
