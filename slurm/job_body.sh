# The one launch body of the slurm/pretrain_<size>_mixln.sh job scripts: sourced by them (after they
# set their size's defaults), never submitted itself. Every setting below is an environment variable
# (`VAR=value sbatch ...`: sbatch passes the submitting shell's environment to the job); docs/slurm.md
# has the table.
#
#   model      PRESET NORM_POSITION (mix) POST_LN_LAYERS (mix only; set but empty: no --post-ln-layers, e.g. for --post-ln-fraction in EXTRA_ARGS) SEQ_LENGTH (256)
#   schedule   TRAIN_ITERS LR WARMUP_ITERS (TRAIN_ITERS/10; linear, then cosine to 0.1 x LR) CLIP_GRAD (1.0)
#   batch      MICRO_BATCH (8) GLOBAL_BATCH (512)
#   engine     DS_CONFIG (ds_configs/zero1.json) BF16 (1) RECOMPUTE (0)
#              DIST_TIMEOUT_MINUTES (10: rendezvous/collective timeout)
#   data       DATA ($ROOT/data/c4_t5: ${DATA}_train_text_document / ${DATA}_valid_text_document of
#              preprocess_c4.py), TRAIN_DATA VALID_DATA (full prefixes, override DATA),
#              TOKENIZER ($ROOT/data/t5/spiece.model; a .model, tokenizer.json, its directory or null:N)
#   output     CKPT ($ROOT/checkpoints/<preset>-<position>: checkpoints, metrics.jsonl, config.json)
#              SAVE_INTERVAL (1000) EVAL_INTERVAL (1000) EVAL_ITERS (40) LOG_INTERVAL (10)
#              GRAD_NORM_INTERVAL (100) KEEP_LAST (3) WANDB_PROJECT (mixln) WANDB_NAME WANDB_MODE (offline)
#   placement  LAUNCHER (srun | deepspeed) GPUS_PER_NODE (processes per node; default the job's
#              --ntasks-per-node) MASTER_ADDR (default: the first node's Slurm NodeAddr) MASTER_PORT
#   paths      ROOT (the repository; default the submit directory) VENV (default $ROOT/.venv)
#   anything   EXTRA_ARGS (appended to the trainer's flags; later flags win); TRAINER_ARGS_FILE (one flag
#              per line: the trainer's whole command line instead of this size's defaults -- what
#              tools/compare_norms.py writes, so a Slurm run trains exactly what a local one would;
#              DATA, TOKENIZER and CKPT are still checked, TRAIN_ITERS still names the final checkpoint)
#   sweeps     NORM_POSITIONS (comma list; with `sbatch --array=0-N`, task i trains position i and
#              saves to $CKPT/<position>)
#   checking   DRY_RUN=1: do every check, print the trainer's command line, exit 0 without training
#   hangs      MAX_HANG_REQUEUES (3): requeues after the trainers' hang watchdog (exit 124), per job
#
# Preemption: `#SBATCH --signal=B:USR1@120` sends SIGUSR1 to this script 120 s before the time limit
# (`scancel --signal=USR1 --batch JOB` does it at once). The trap is installed first thing. The signal
# is forwarded to the trainers (only them), which finish the step, save and exit 0; the job then
# requeues itself and resumes from that checkpoint. A signal before the trainers started requeues
# without starting them; a trainer that dies of one anyway still leads to the requeue, with a line
# saying so. A hang (the trainers' watchdog, --hang-timeout, dumps stacks and exits 124) requeues too,
# resuming from the newest checkpoint, at most MAX_HANG_REQUEUES times per job (counted in
# $CKPT/.hang_requeues.<job id>; each requeue's line says which of how many). Trainers that fail
# otherwise fail the job (srun --kill-on-bad-exit: at once, no hang); resubmitting resumes from the
# newest checkpoint in CKPT.
set -euo pipefail
usr1=0 TRAIN_PID=""
ts() { date -u +%H:%M:%S; }
on_usr1() {
    usr1=1
    echo "[$(ts)] SIGUSR1: asking the trainers to save and exit"
    [ -z "$TRAIN_PID" ] || forward_usr1
}
trap on_usr1 USR1
fail() { echo "${SLURM_JOB_NAME:-job_body.sh}: error: $*" >&2; exit 2; }  # one line, in the job's output, before any launch

[ -n "${SLURM_JOB_ID:-}" ] || fail "not inside a Slurm job: submit the script with sbatch"
ROOT="${ROOT:-${SLURM_SUBMIT_DIR:-$(pwd)}}"
cd "$ROOT" || fail "ROOT=$ROOT: no such directory"
PY="${VENV:-$ROOT/.venv}/bin/python"
[ -x "$PY" ] || fail "VENV: $PY not found (set VENV to the environment with megatron_mixln's dependencies)"
LAUNCHER="${LAUNCHER:-srun}"
case "$LAUNCHER" in srun | deepspeed) ;; *) fail "LAUNCHER=$LAUNCHER: expected srun or deepspeed" ;; esac

# Sizes and schedule: the calling script set its size's defaults (PRESET, LR, TRAIN_ITERS, ...).
PRESET="${PRESET:?PRESET: set a model preset (71m, 130m, 250m, 350m, 1b, 7b, ...)}"
NORM_POSITION="${NORM_POSITION:-mix}"
if [ -n "${NORM_POSITIONS:-}" ]; then  # an array job: one norm position per array task
    IFS=, read -ra positions <<< "$NORM_POSITIONS"
    i="${SLURM_ARRAY_TASK_ID:?NORM_POSITIONS needs an array job: sbatch --array=0-$((${#positions[@]} - 1))}"
    [ "$i" -lt "${#positions[@]}" ] || fail "NORM_POSITIONS=$NORM_POSITIONS has no entry for array task $i"
    NORM_POSITION="${positions[$i]}"
fi
SEQ_LENGTH="${SEQ_LENGTH:-256}"
TRAIN_ITERS="${TRAIN_ITERS:?TRAIN_ITERS: set the number of optimizer steps}"
LR="${LR:?LR: set the peak learning rate}"
WARMUP_ITERS="${WARMUP_ITERS:-$((TRAIN_ITERS / 10))}"
GLOBAL_BATCH="${GLOBAL_BATCH:-512}"
MICRO_BATCH="${MICRO_BATCH:-8}"
DS_CONFIG="${DS_CONFIG:-ds_configs/zero1.json}"
[ -f "$DS_CONFIG" ] || fail "DS_CONFIG=$DS_CONFIG: no such file"

# Data and tokenizer: checked here, in the first second of the job, not after the rendezvous.
DATA="${DATA:-$ROOT/data/c4_t5}"
TRAIN_DATA="${TRAIN_DATA:-${DATA}_train_text_document}"
VALID_DATA="${VALID_DATA:-${DATA}_valid_text_document}"
TOKENIZER="${TOKENIZER:-$ROOT/data/t5/spiece.model}"
for prefix in "$TRAIN_DATA" "$VALID_DATA"; do
    for ext in bin idx; do
        [ -f "$prefix.$ext" ] || fail "DATA: $prefix.$ext does not exist (expected the .bin/.idx pair" \
            "from tools/preprocess_c4.py; set DATA=prefix or TRAIN_DATA/VALID_DATA)"
    done
done
case "$TOKENIZER" in
null:*) ;;
*) [ -e "$TOKENIZER" ] || fail "TOKENIZER=$TOKENIZER does not exist (a sentencepiece .model, tokenizer.json or its directory)" ;;
esac

CKPT="${CKPT:-$ROOT/checkpoints/$PRESET-$NORM_POSITION}"
[ -z "${NORM_POSITIONS:-}" ] || CKPT="$CKPT/$NORM_POSITION"
mkdir -p "$CKPT" || fail "CKPT=$CKPT: cannot create the directory"

# Placement: the first node's address as Slurm has it (NodeAddr), not its name, which may not resolve.
first_node="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"
if [ -z "${MASTER_ADDR:-}" ]; then
    MASTER_ADDR="$(scontrol show node "$first_node" | sed -n 's/.*NodeAddr=\([^ ]*\).*/\1/p' | head -n 1)"
    [ -n "$MASTER_ADDR" ] || fail "MASTER_ADDR: scontrol show node $first_node gave no NodeAddr (set MASTER_ADDR)"
fi
export MASTER_ADDR
export MASTER_PORT="${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}"
GPUS_PER_NODE="${GPUS_PER_NODE:-${SLURM_NTASKS_PER_NODE:-1}}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}" TOKENIZERS_PARALLELISM=false
export WANDB_MODE="${WANDB_MODE:-offline}"
export SRUN_CPUS_PER_TASK="${SLURM_CPUS_PER_TASK:-1}"  # srun >= 22.05 no longer inherits --cpus-per-task
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"

args=(
    --preset "$PRESET" --norm-position "$NORM_POSITION"
    --tokenizer "$TOKENIZER" --seq-length "$SEQ_LENGTH"
    --data-path "$TRAIN_DATA" --valid-data-path "$VALID_DATA"
    --micro-batch-size "$MICRO_BATCH" --global-batch-size "$GLOBAL_BATCH" --train-iters "$TRAIN_ITERS"
    --optimizer adam --lr "$LR" --lr-warmup-iters "$WARMUP_ITERS" --lr-decay-style cosine
    --clip-grad "${CLIP_GRAD:-1.0}" --deepspeed-config "$DS_CONFIG"
    --distributed-timeout-minutes "${DIST_TIMEOUT_MINUTES:-10}"
    --eval-interval "${EVAL_INTERVAL:-1000}" --eval-iters "${EVAL_ITERS:-40}" --log-interval "${LOG_INTERVAL:-10}"
    --grad-norm-interval "${GRAD_NORM_INTERVAL:-100}"
    --save "$CKPT" --save-interval "${SAVE_INTERVAL:-1000}" --keep-last "${KEEP_LAST:-3}"
    --wandb-project "${WANDB_PROJECT:-mixln}" --wandb-name "${WANDB_NAME:-$PRESET-$NORM_POSITION-$SLURM_JOB_ID}"
    --wandb-mode "$WANDB_MODE"
)
if [ "$NORM_POSITION" = mix ] && [ -n "${POST_LN_LAYERS:-}" ]; then args+=(--post-ln-layers "$POST_LN_LAYERS"); fi
if [ "${BF16:-1}" = 1 ]; then args+=(--bf16); fi
if [ "${RECOMPUTE:-0}" = 1 ]; then args+=(--recompute-activations); fi
if [ -f "$CKPT/latest" ]; then args+=(--load "$CKPT"); fi
read -ra extra <<< "${EXTRA_ARGS:-}"
args+=("${extra[@]}")
if [ -n "${TRAINER_ARGS_FILE:-}" ]; then  # one whole trainer command line (tools/compare_norms.py): none of the
    [ -f "$TRAINER_ARGS_FILE" ] || fail "TRAINER_ARGS_FILE=$TRAINER_ARGS_FILE: no such file"  # size's defaults
    mapfile -t args < "$TRAINER_ARGS_FILE"
    [ -f "$CKPT/latest" ] && args+=(--load "$CKPT")
fi

final_tag="$(printf 'iter_%07d' "$TRAIN_ITERS")"
latest() { cat "$CKPT/latest" 2>/dev/null || echo none; }
requeue() {
    echo "[$(ts)] not finished: requeueing job $SLURM_JOB_ID to resume from $(latest) ($*)"
    scontrol requeue "$SLURM_JOB_ID"
    exit 0
}
echo "[$(ts)] job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}) $PRESET $NORM_POSITION:" \
     "$SLURM_NNODES nodes x $GPUS_PER_NODE processes, $LAUNCHER, master $MASTER_ADDR:$MASTER_PORT" \
     "($first_node), checkpoints $CKPT, resume: $(latest)"
if [ "$(latest)" = "$final_tag" ]; then echo "[$(ts)] $CKPT already holds the final $final_tag: nothing to do"; exit 0; fi
if [ "${DRY_RUN:-0}" = 1 ]; then echo "dry run: $(printf '%q ' "$PY" -m megatron_mixln.pretrain "${args[@]}")"; exit 0; fi
if [ "$usr1" = 1 ]; then requeue "SIGUSR1 came before the trainers started"; fi

# The signal goes to the trainers only (DeepSpeed's launcher processes, and a python that is still
# starting, would die of it): one `srun --overlap` task per node signals this job's trainers there --
# `-m megatron_mixln.pretrain` processes whose environment holds this SLURM_JOB_ID and that catch
# SIGUSR1 (bit 10 of SigCgt in /proc/PID/status). One is enough: the flag is all-reduced every step.
# Retried while none is ready yet.
forward_usr1() {
    local n deadline=$((SECONDS + 600))
    while kill -0 "$TRAIN_PID" 2>/dev/null && [ $SECONDS -lt $deadline ]; do
        n="$(srun --overlap --nodes="$SLURM_NNODES" --ntasks="$SLURM_NNODES" --ntasks-per-node=1 --cpus-per-task=1 \
            bash -c 'for p in $(pgrep -f "[-]m megatron_mixln[.]pretrain"); do
                         tr "\0" "\n" < /proc/$p/environ 2>/dev/null | grep -qx "SLURM_JOB_ID=$SLURM_JOB_ID" || continue
                         caught="$(sed -n "s/^SigCgt:[[:space:]]*//p" /proc/$p/status 2>/dev/null)"
                         (( (0x${caught:-0} >> 9) & 1 )) && kill -USR1 "$p" 2>/dev/null && echo "$p"
                     done; true' 2>/dev/null | sort -u | wc -l)" || n=0
        if [ "$n" -gt 0 ]; then echo "[$(ts)] SIGUSR1 forwarded to $n trainer(s)"; return 0; fi
        sleep 2
    done
}
if [ "$LAUNCHER" = srun ]; then
    # One python per task; one failed task ends the step at once (--kill-on-bad-exit).
    srun --kill-on-bad-exit=1 --cpu-bind=none "$PY" -u -m megatron_mixln.pretrain "${args[@]}" &
else
    # DeepSpeed's launcher without ssh: one `deepspeed --no_ssh --node_rank N` per node (started by
    # srun), each starting GPUS_PER_NODE trainers there. The host names in the hostfile are labels only.
    HOSTFILE="$CKPT/hostfile.$SLURM_JOB_ID"
    scontrol show hostnames "$SLURM_JOB_NODELIST" | sed "s/\$/ slots=$GPUS_PER_NODE/" > "$HOSTFILE"
    srun --kill-on-bad-exit=1 --cpu-bind=none --ntasks-per-node=1 --ntasks="$SLURM_NNODES" \
        --cpus-per-task="$((SRUN_CPUS_PER_TASK * GPUS_PER_NODE))" \
        bash -c 'exec "$0" -m deepspeed.launcher.runner --hostfile "$1" --no_ssh --node_rank "$SLURM_NODEID" \
                 --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" --module megatron_mixln.pretrain "${@:2}"' \
        "$PY" "$HOSTFILE" "${args[@]}" &
fi
TRAIN_PID=$!
if [ "$usr1" = 1 ]; then forward_usr1; fi  # it came while the launch was being set up
# `wait` returns early when the trap fires; wait again for the trainers to save and exit (bash keeps
# a finished child's status, so the second wait returns the real exit code).
while :; do
    status=0
    wait "$TRAIN_PID" || status=$?
    kill -0 "$TRAIN_PID" 2>/dev/null || break
done

echo "[$(ts)] trainers exited with $status; latest checkpoint: $(latest)"
if [ "$(latest)" = "$final_tag" ]; then exit 0; fi
if [ "$usr1" = 1 ]; then
    [ "$status" = 0 ] || echo "[$(ts)] the trainers did not exit cleanly after SIGUSR1 (status $status)"
    requeue "preempted"
fi
if [ "$status" = 0 ]; then requeue "stopped early (--exit-interval?)"; fi
if [ "$status" = 124 ]; then  # the hang watchdog's exit (megatron_mixln.training.watchdog): a requeue may clear it
    max_hangs="${MAX_HANG_REQUEUES:-3}" hang_file="$CKPT/.hang_requeues.$SLURM_JOB_ID"
    hangs="$(cat "$hang_file" 2>/dev/null || echo 0)"
    if [ "$hangs" -lt "$max_hangs" ]; then
        echo "$((hangs + 1))" > "$hang_file"
        requeue "the trainers hung (exit 124, stacks above): hang requeue $((hangs + 1)) of MAX_HANG_REQUEUES=$max_hangs"
    fi
    echo "${SLURM_JOB_NAME:-job_body.sh}: error: the trainers hung (exit 124, stacks above) after $hangs hang requeues (MAX_HANG_REQUEUES=$max_hangs);" \
         "not requeueing again: find the stuck call in the stacks, then resubmit to resume from $CKPT ($(latest))" >&2
    exit 124
fi
echo "${SLURM_JOB_NAME:-job_body.sh}: error: the trainers failed (status $status); resubmit to resume from $CKPT ($(latest))" >&2
exit "$status"
