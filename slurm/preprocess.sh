#!/bin/bash
# Tokenize a corpus on many nodes: a job array (task i runs tools/preprocess_c4.py --shard-index i
# --num-shards N on its part of the input files) and a job that starts when all of them succeeded
# and merges the parts, in order, with tools/merge_datasets.py. The merged dataset is byte for byte
# what one preprocess_c4.py run over all the files writes.
#
#   INPUT='data/c4/en/c4-train.*.json.gz' TOKENIZER=data/t5/spiece.model OUTPUT_PREFIX=data/c4_t5_train \
#   NUM_SHARDS=64 bash slurm/preprocess.sh [--sbatch options, e.g. --partition=cpu --cpus-per-task=32]
#
# Writes OUTPUT_PREFIX_text_document.bin/.idx/.summary.json (one per --json-keys key), and the
# parts OUTPUT_PREFIX_partNNNNN_text_document.* (kept, KEEP_PARTS=0 removes them after the merge).
# Resumable: rerun the same command after a failure or a kill; parts with a summary are skipped,
# a part killed midway resumes from its finished shards (preprocess_c4.py's own resume), and a
# finished merge is not redone. Extra preprocess_c4.py flags: PREPROCESS_ARGS (e.g. "--append-eod
# --tokenizer-backend auto"). Paths: ROOT (the repository; default the submit directory), VENV
# (default $ROOT/.venv).
#
#SBATCH --job-name=mixln-preprocess
#SBATCH --open-mode=append
set -euo pipefail

fail() { echo "preprocess.sh: $*" >&2; exit 2; }
ROOT="${ROOT:-${SLURM_SUBMIT_DIR:-$(pwd)}}"
cd "$ROOT" || fail "ROOT=$ROOT: no such directory"
PY="${VENV:-$ROOT/.venv}/bin/python"
[ -x "$PY" ] || fail "VENV: $PY not found (set VENV to the environment with megatron_mixln's dependencies)"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
: "${INPUT:?set INPUT to the input files (a glob, quoted)}"
: "${TOKENIZER:?set TOKENIZER (sentencepiece .model, tokenizer.json or its directory)}"
: "${OUTPUT_PREFIX:?set OUTPUT_PREFIX (writes OUTPUT_PREFIX_<key>_document.*)}"
: "${NUM_SHARDS:?set NUM_SHARDS (array tasks, at most the number of input files)}"
JSON_KEYS="${JSON_KEYS:-text}"
read -r -a EXTRA <<< "${PREPROCESS_ARGS:-}"
part() { printf '%s_part%05d' "$OUTPUT_PREFIX" "$1"; }

if [ "${MIXLN_PREPROCESS_STEP:-submit}" = merge ]; then
    for key in $JSON_KEYS; do
        out="${OUTPUT_PREFIX}_${key}_document"
        if [ -f "$out.summary.json" ]; then echo "[$(date)] $out: merged already"; continue; fi
        parts=()
        for ((i = 0; i < NUM_SHARDS; i++)); do parts+=("$(part "$i")_${key}_document"); done
        "$PY" tools/merge_datasets.py --input "${parts[@]}" --output-prefix "$out"
        if [ "${KEEP_PARTS:-1}" = 0 ]; then
            for p in "${parts[@]}"; do rm -f "$p.bin" "$p.idx" "$p.summary.json"; done
        fi
    done
    exit 0
fi

if [ -n "${SLURM_ARRAY_TASK_ID:-}" ]; then
    i="$SLURM_ARRAY_TASK_ID"
    done_all=1
    for key in $JSON_KEYS; do [ -f "$(part "$i")_${key}_document.summary.json" ] || done_all=0; done
    if [ "$done_all" = 1 ]; then echo "[$(date)] part $i: done already"; exit 0; fi
    # shellcheck disable=SC2086
    exec "$PY" tools/preprocess_c4.py --input "$INPUT" --tokenizer "$TOKENIZER" --json-keys $JSON_KEYS \
        --output-prefix "$(part "$i")" --shard-index "$i" --num-shards "$NUM_SHARDS" \
        --workers "${SLURM_CPUS_PER_TASK:-$(nproc)}" --no-progress "${EXTRA[@]}"
fi

# Submit: check the partition before queueing anything (a bad NUM_SHARDS fails here, in one line).
"$PY" - "$NUM_SHARDS" "$INPUT" <<'PY' || exit 2
import sys
from megatron_mixln.data.errors import DataError
from megatron_mixln.data.inputs import expand_inputs
from megatron_mixln.data.multinode import partition_files
try:
    partition_files(expand_inputs([sys.argv[2]]), 0, int(sys.argv[1]))
except DataError as err:
    sys.exit(f"preprocess.sh: {err}")
PY
array=$(sbatch --parsable --array="0-$((NUM_SHARDS - 1))" --export=ALL,ROOT="$ROOT" "$@" "$0")
array="${array%%;*}"
merge=$(sbatch --parsable --dependency="afterok:$array" --export=ALL,ROOT="$ROOT",MIXLN_PREPROCESS_STEP=merge \
        "$@" "$0")
echo "submitted: array job ${array} (${NUM_SHARDS} parts), merge job ${merge%%;*} after it"
