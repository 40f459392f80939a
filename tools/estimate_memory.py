#!/usr/bin/env python
"""Per-GPU memory of a training layout before a cluster is allocated: model states per ZeRO stage,
activations for the chosen norm positions, ZeRO buffers, CPU memory with offload; fits or not, and
the smallest change that would.

    python tools/estimate_memory.py --preset 7b --norm-position mix --post-ln-layers 2 --bf16 \\
        --nodes 4 --gpus-per-node 8 --gpu-memory-gib 80 --deepspeed-config ds_configs/zero3.json \\
        --micro-batch-size 8 --seq-length 256 --recompute-activations

Exit status 0 when it fits, 1 when it does not, 2 for bad flags or an impossible layout.
"""
from __future__ import annotations

import os
import sys

# The planner only calls DeepSpeed's estimator arithmetic: skip its accelerator probe (and its warning).
os.environ.setdefault("DS_ACCELERATOR", "cpu")

from megatron_mixln.errors import run_tool  # noqa: E402
from megatron_mixln.planning import format_plan, plan_memory  # noqa: E402
from megatron_mixln.planning.cli import parse  # noqa: E402


def main(argv=None) -> int:
    return run_tool(_main, "estimate_memory", argv)


def _main(argv) -> int:
    model, layout, zero, args = parse(argv)
    plan = plan_memory(model, layout, zero, args.gpu_memory_gib, args.cpu_memory_gib, args.reserve_gib,
                       args.global_batch_size)  # a LayoutError (an impossible layout) exits 2 with one line
    print(format_plan(plan))
    return 0 if plan.fits else 1


if __name__ == "__main__":
    sys.exit(main())
