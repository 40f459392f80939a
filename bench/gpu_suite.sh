#!/usr/bin/env bash
# Everything this project measures on a GPU, in one command, on a single-GPU machine, within 8 minutes:
#
#   bash bench/gpu_suite.sh              # run it all; results in outputs/gpu_suite/results.md (+ logs, JSON)
#   bash bench/gpu_suite.sh --dry-run    # print each step's command and time budget; run nothing (CPU too)
#
# Steps (each under its own time limit, so one slow or failing step cannot eat the others' time;
# every step's status, time and output tail go into ONE results file):
#   1 setup       launchers/setup_env.sh into $VENV, keeping the CUDA torch there. $VENV: given, else
#                 .venv if it exists, else the environment of a `python3` that already has a CUDA torch
#                 (a GPU image's own venv), else a new .venv. Offline machines (pip cannot reach an index):
#                 build/download the missing wheels elsewhere (`pip wheel deepspeed==<pin> --no-deps`,
#                 liger-kernel, ...) into a folder and pass WHEELS=folder: they are installed first,
#                 with --no-index. liger-kernel is optional (the kernel sweep runs without it)
#   2 cuda tests  the GPU-marked kernel tests, and the model/cross-block-fusion kernel tests on CUDA
#   3 kernels     bench/norm_kernels.py --quick (Triton vs torch eager, torch.compile, apex/Liger where importable)
#   4 throughput  bench/throughput.py: 130m, 350m, 1b in bf16 with compile vs transformers' eager loop
#   5 7b smoke    the 7b preset with the 7B Slurm job's settings (Mix-LN k=2, Adam, bf16, ZeRO-3,
#                 recompute) for a few steps on the one GPU, optimizer states offloaded to the CPU
#                 (see choose_7b_config): tokens/s and peak memory
#
# Environment: VENV, WHEELS, OUT_DIR (default outputs/gpu_suite), RESULTS (default $OUT_DIR/results.md),
# SEVEN_B_STEPS (default 3), ZERO_CONFIG (the 7B smoke's DeepSpeed config; default: see choose_7b_config).
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
DRY=0
case "${1:-}" in
    --dry-run) DRY=1 ;;
    "") ;;
    *) echo "gpu_suite.sh: unknown argument '$1' (expected nothing or --dry-run)" >&2; exit 2 ;;
esac
if [ -z "${VENV:-}" ]; then
    if [ -x "$ROOT/.venv/bin/python" ]; then
        VENV="$ROOT/.venv"
    elif python3 -c "import torch, sys; assert torch.cuda.is_available() and sys.prefix != sys.base_prefix" 2>/dev/null; then
        VENV="$(python3 -c 'import sys; print(sys.prefix)')"   # the image's venv that holds its CUDA torch
    else
        VENV="$ROOT/.venv"
    fi
fi
WHEELS="${WHEELS:-}"
export PIP_RETRIES="${PIP_RETRIES:-0}" PIP_DEFAULT_TIMEOUT="${PIP_DEFAULT_TIMEOUT:-5}"  # offline: fail fast
OUT_DIR="${OUT_DIR:-$ROOT/outputs/gpu_suite}"
RESULTS="${RESULTS:-$OUT_DIR/results.md}"
SEVEN_B_STEPS="${SEVEN_B_STEPS:-3}"
PY="$VENV/bin/python"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" TOKENIZERS_PARALLELISM=false WANDB_MODE="${WANDB_MODE:-offline}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-8}"
START=$SECONDS
# budgets in seconds: 40 + 60 + 50 + 120 + 210 = 480 (8 minutes)
declare -A BUDGET=([setup]=40 [cuda_tests]=60 [kernels]=50 [throughput]=120 [7b_smoke]=210)
STEPS=(setup cuda_tests kernels throughput 7b_smoke)

choose_7b_config() {
    # tools/estimate_memory.py decides: ZeRO-3 with everything on the GPU if that fits this GPU's
    # memory (exit 0), else ZeRO-3 with the optimizer offloaded to CPU -- 7B's bf16 params and grads
    # (~27 GB) on the GPU, fp32 master weights and Adam moments (~81 GB) in host memory.
    if [ -n "${ZERO_CONFIG:-}" ]; then echo "$ZERO_CONFIG"; return; fi
    local gib
    gib="$("$PY" -c 'import torch; print(int(torch.cuda.get_device_properties(0).total_memory / 2**30))' 2>/dev/null || echo 80)"
    if "$PY" tools/estimate_memory.py --preset 7b --nodes 1 --gpus-per-node 1 --gpu-memory-gib "$gib" \
            --zero-stage 3 --micro-batch-size 8 --seq-length 256 --bf16 --recompute-activations >&2; then
        echo ds_configs/zero3.json
    else
        echo ds_configs/zero3_offload.json
    fi
}

cmd_setup() {
    if [ -n "$WHEELS" ]; then
        "$PY" -m pip install -q --no-index --no-deps "$WHEELS"/*.whl || echo "could not install the wheels in $WHEELS"
    fi
    VENV="$VENV" bash launchers/setup_env.sh || echo "setup_env.sh failed (offline?): continuing with what is importable"
    "$PY" -c "import liger_kernel" 2>/dev/null \
        || "$PY" -m pip install -q liger-kernel==0.8.5 2>&1 | tail -n 2 \
        || echo "liger-kernel not installable: the kernel sweep runs without it"
    "$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device visible to torch'; \
print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name())"
}

cmd_cuda_tests() {
    "$PY" -m pytest -q -p no:cacheprovider -x tests/kernels/test_add_norm_gpu.py tests/kernels/test_add_norm_model.py \
        tests/kernels/test_cross_block_fusion_kernels.py
}

cmd_kernels() {
    "$PY" bench/norm_kernels.py --quick
}

cmd_throughput() {
    "$PY" bench/throughput.py --presets 130m 350m 1b --vocab-size 32000 --dtype bf16 --compile on --hf-compile off \
        --micro-batch-size 16 --seq-length 256 --repeats 3 --steps 3 --warmup 2 --json "$OUT_DIR/throughput.json"
}

cmd_7b_smoke() {
    local data="$OUT_DIR/7b_data" cfg
    cfg="$(choose_7b_config)"
    echo "DeepSpeed config: $cfg"
    "$PY" - "$data" <<'EOF'
import sys, numpy as np
from megatron_mixln.data.indexed_writer import IndexedDatasetWriter
rng = np.random.default_rng(0)  # random ids < 32000: the smoke run measures speed, not learning
with IndexedDatasetWriter(sys.argv[1] + "_text_document", np.uint16) as w:
    for _ in range(512):
        w.add_document(rng.integers(1, 32000, 600, dtype=np.uint16))
EOF
    # the 7B Slurm job's model and optimizer settings (slurm/pretrain_7b_mixln.sh), one GPU, a few steps;
    # --torch-adam: the optimizer that job runs (torch Adam; ZeRO-3 without offload defaults to it), here
    # stepping the offloaded states on the CPU -- no DeepSpeed CPU-Adam op to JIT-build on a bare machine
    "$PY" -m megatron_mixln.pretrain --preset 7b --norm-position mix --post-ln-layers 2 \
        --tokenizer null:32000 --seq-length 256 --data-path "${data}_text_document" \
        --micro-batch-size 8 --global-batch-size 8 --train-iters "$SEVEN_B_STEPS" \
        --optimizer adam --lr 5e-4 --lr-warmup-fraction 0.1 --lr-decay-style cosine --clip-grad 1.0 \
        --bf16 --deepspeed-config "$cfg" --recompute-activations --torch-adam \
        --eval-iters 0 --log-interval 1 --run-dir "$OUT_DIR/7b_run"
    "$PY" - "$OUT_DIR/7b_run/metrics.jsonl" <<'EOF'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if '"train"' in l]
for r in rows:
    print("7b step", r.get("step"), {k: r.get(k) for k in ("tokens_per_sec", "mfu", "memory_gib", "loss")})
EOF
}

run_step() {
    local name="$1" budget="${BUDGET[$1]}" log="$OUT_DIR/$1.log" t0=$SECONDS rc
    if [ "$DRY" = 1 ]; then
        echo "== $name (limit ${budget}s)"
        declare -f "cmd_$name" | sed '1,2d;$d'
        return 0
    fi
    echo "== [$((SECONDS - START))s] $name (limit ${budget}s) -> $log"
    # shellcheck disable=SC2031
    timeout --kill-after=10 "$budget" bash -c "$(declare -f choose_7b_config "cmd_$name"); cmd_$name" >"$log" 2>&1
    rc=$?
    local status=ok
    [ "$rc" = 124 ] || [ "$rc" = 137 ] && status="timed out after ${budget}s"
    [ "$rc" != 0 ] && [ "$status" = ok ] && status="failed (exit $rc)"
    {
        echo "## $name: $status ($((SECONDS - t0)) s)"
        echo
        echo '```'
        tail -n 60 "$log"
        echo '```'
        echo
    } >>"$RESULTS.tmp"
    echo "   $status ($((SECONDS - t0)) s)"
}

if [ "$DRY" = 1 ]; then
    echo "gpu_suite.sh --dry-run: VENV=$VENV OUT_DIR=$OUT_DIR RESULTS=$RESULTS (total limit 480 s)"
else
    if ! nvidia-smi -L >/dev/null 2>&1; then  # before anything is installed anywhere
        echo "gpu_suite.sh: no NVIDIA GPU here (nvidia-smi -L failed); on a machine without one use --dry-run" >&2
        exit 1
    fi
    mkdir -p "$OUT_DIR"
    {
        echo "# GPU suite: $(date -u '+%Y-%m-%d %H:%M UTC')"
        echo
        echo "host $(hostname); command: bash bench/gpu_suite.sh; $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo 'nvidia-smi not found')"
        echo
    } >"$RESULTS.tmp"
fi
export ROOT OUT_DIR PY SEVEN_B_STEPS VENV WHEELS
for step in "${STEPS[@]}"; do
    run_step "$step"
done
if [ "$DRY" = 0 ]; then
    echo "total: $((SECONDS - START)) s" >>"$RESULTS.tmp"
    mv "$RESULTS.tmp" "$RESULTS"
    echo "results: $RESULTS"
fi
