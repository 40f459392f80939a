#!/usr/bin/env bash
# Quickstart: the whole pipeline on a laptop-sized CPU job (docs/training.md#quickstart has the time and
# perplexities it gave on a 2-core machine).
#
#   bash launchers/quickstart.sh            # outputs under outputs/quickstart/
#   OUT=/tmp/qs TRAIN_ITERS=600 bash launchers/quickstart.sh
#
#  1. environment (launchers/setup_env.sh: creates/reuses .venv)
#  2. a C4-format sample corpus: 4 MB of the one shipped with the project (no network)
#  3. a sentencepiece BPE tokenizer trained on it
#  4. Megatron indexed binaries of its train and validation splits
#  5. pretraining of the same small model twice -- Mix-LN (first layer Post-LN, the rest Pre-LN)
#     and Pre-LN -- each with 2 CPU processes, ZeRO-1, DeepSpeed's launcher
#  6. validation perplexity of both, and plots (loss, perplexity, per-layer gradient norms)
#
# Steps 2-4 are skipped when their outputs exist, and a finished run is not retrained (a run that
# was interrupted resumes from its last checkpoint), so rerunning is cheap.
# Network: the launcher's rendezvous listens on all interfaces. As root (where `unshare -n` works)
# the runs happen in a private network namespace that has only loopback; otherwise they run
# plainly, bound to 127.0.0.1 (set NETNS=0 to force that).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
source launchers/setup_env.sh
PY="$VENV/bin/python"

OUT="${OUT:-$ROOT/outputs/quickstart}"
DATA="$OUT/data"
TRAIN_ITERS="${TRAIN_ITERS:-300}"
NPROC="${NPROC:-2}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" TOKENIZERS_PARALLELISM=false WANDB_MODE="${WANDB_MODE:-offline}"
mkdir -p "$DATA"
start=$SECONDS
say() { printf '\n[quickstart %3ds] %s\n' "$((SECONDS - start))" "$*"; }

say "sample corpus -> $DATA/c4"
if ! ls "$DATA"/c4/c4-validation.*.json.gz >/dev/null 2>&1; then
    "$PY" tools/make_sample_corpus.py --output-dir "$DATA/c4" --target-mb 4
else echo "reusing"; fi

say "tokenizer -> $DATA/spm.model"
if [ ! -f "$DATA/spm.model" ]; then
    "$PY" tools/train_tokenizer.py --input "$DATA/c4/c4-train.*.json.gz" --output-prefix "$DATA/spm" \
        --vocab-size 4000 --model-type bpe
else echo "reusing"; fi

say "indexed binaries -> $DATA/{train,valid}_text_document.{bin,idx}"
for split in train:train validation:valid; do
    src="${split%%:*}" dst="${split##*:}"
    if [ ! -f "$DATA/${dst}_text_document.idx" ]; then
        "$PY" tools/preprocess_c4.py --input "$DATA/c4/c4-$src.*.json.gz" --tokenizer "$DATA/spm.model" \
            --output-prefix "$DATA/$dst" --append-eod --workers 2 --no-progress
    else echo "reusing $dst"; fi
done

netns=()
if [ "${NETNS:-1}" = 1 ] && [ "$(id -u)" = 0 ] && unshare -n true 2>/dev/null; then
    netns=(unshare -n bash -c 'ip link set lo up && exec "$@"' _)
    echo "runs start in a private network namespace (unshare -n)"
fi

# The model: the 9m preset's shape (hidden 128, 4 layers, 4 heads), vocab 4000 -> 4096, seq 128.
common=(--preset 9m --tokenizer "$DATA/spm.model" --seq-length 128
        --data-path "$DATA/train_text_document" --valid-data-path "$DATA/valid_text_document"
        --micro-batch-size 8 --global-batch-size 16 --train-iters "$TRAIN_ITERS"
        --optimizer adam --lr 3e-3 --lr-warmup-fraction 0.1 --clip-grad 1.0
        --eval-interval 100 --eval-iters 8 --log-interval 20 --grad-norm-interval 10
        --deepspeed-config ds_configs/zero1.json --save-interval 100 --keep-last 1 --seed 1234)

for pos in mix pre; do
    run="$OUT/runs/$pos"
    extra=(--norm-position "$pos")
    [ "$pos" = mix ] && extra+=(--post-ln-layers 1)
    if [ "$(cat "$run/latest" 2>/dev/null)" = "$(printf 'iter_%07d' "$TRAIN_ITERS")" ]; then
        say "$pos: finished earlier, reusing $run"; continue
    fi
    [ -f "$run/latest" ] && extra+=(--load "$run")
    say "pretraining $pos ($NPROC processes) -> $run"
    NUM_GPUS="$NPROC" MASTER_PORT="${MASTER_PORT:-29511}" "${netns[@]}" \
        launchers/deepspeed_pretrain.sh "${common[@]}" "${extra[@]}" --save "$run" 2>&1 \
        | grep -v -E '^\[20[0-9-]+ [0-9:,]+\] \[(INFO|WARNING)\]|FutureWarning|return func\(|socket.cpp'
done

say "plots -> $OUT/plots"
"$PY" tools/plot_metrics.py "$OUT/runs/mix" "$OUT/runs/pre" --out "$OUT/plots"
say "done in $((SECONDS - start)) s. Metrics: $OUT/runs/{mix,pre}/metrics.jsonl; plots: $OUT/plots/; checkpoints: $OUT/runs/{mix,pre}/"
