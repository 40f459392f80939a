#!/usr/bin/env bash
# Pretrain with torchrun. Every argument goes to `python -m megatron_mixln.pretrain`.
#
#   launchers/torchrun_pretrain.sh --preset 130m --deepspeed-config ds_configs/zero1.json ...
#   NPROC_PER_NODE=8 NNODES=2 NODE_RANK=0 MASTER_ADDR=node0 launchers/torchrun_pretrain.sh ...
#
# Environment: NPROC_PER_NODE (default: visible GPUs, or 1 on CPU), NNODES (1), NODE_RANK (0),
# MASTER_ADDR (127.0.0.1), MASTER_PORT (29500). torchrun's store listens on all interfaces: on a
# shared machine run it inside a private network namespace (see launchers/quickstart.sh).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/launchers/venv_python.sh"  # PY, or a message saying how to create the environment
if [ -z "${NPROC_PER_NODE:-}" ]; then
    NPROC_PER_NODE="$("$PY" -c 'import torch; print(max(torch.cuda.device_count(), 1))' 2>/dev/null || echo 1)"
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
exec "$PY" -m torch.distributed.run \
    --nproc_per_node "$NPROC_PER_NODE" --nnodes "${NNODES:-1}" --node_rank "${NODE_RANK:-0}" \
    --master_addr "${MASTER_ADDR:-127.0.0.1}" --master_port "${MASTER_PORT:-29500}" \
    -m megatron_mixln.pretrain "$@"
