#!/usr/bin/env bash
# Pretrain with DeepSpeed's launcher. Every argument goes to `python -m megatron_mixln.pretrain`.
#
#   launchers/deepspeed_pretrain.sh --preset 130m --norm-position mix --post-ln-layers 3 ...
#   NUM_GPUS=8 launchers/deepspeed_pretrain.sh ...                 # one node, 8 GPUs
#   HOSTFILE=hostfile NUM_NODES=4 NUM_GPUS=8 launchers/deepspeed_pretrain.sh ...   # multi-node (pdsh/ssh)
#
# Environment: NUM_GPUS (processes per node; default: visible GPUs, or 1 on a CPU machine),
# HOSTFILE ("host slots=N" lines; enables multi-node), NUM_NODES, MASTER_ADDR, MASTER_PORT (29500).
# On CPU, DeepSpeed starts CPU ranks talking gloo. Its rendezvous listens on all interfaces: on a
# shared machine run it inside a private network namespace (see launchers/quickstart.sh).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/launchers/venv_python.sh"  # PY, or a message saying how to create the environment
if [ -z "${NUM_GPUS:-}" ]; then
    NUM_GPUS="$("$PY" -c 'import torch; print(max(torch.cuda.device_count(), 1))' 2>/dev/null || echo 1)"
fi
launcher=(--num_gpus "$NUM_GPUS" --master_port "${MASTER_PORT:-29500}")
if [ -n "${HOSTFILE:-}" ]; then
    launcher+=(--hostfile "$HOSTFILE")
    [ -n "${NUM_NODES:-}" ] && launcher+=(--num_nodes "$NUM_NODES")
    [ -n "${MASTER_ADDR:-}" ] && launcher+=(--master_addr "$MASTER_ADDR")
else
    launcher+=(--master_addr "${MASTER_ADDR:-127.0.0.1}")
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
exec "$PY" -m deepspeed.launcher.runner "${launcher[@]}" --module megatron_mixln.pretrain "$@"
