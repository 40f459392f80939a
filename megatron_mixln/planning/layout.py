"""A training layout (cluster shape, parallel sizes, ZeRO stage, batch) and its validity checks."""
from __future__ import annotations

from dataclasses import dataclass, replace

from megatron_mixln.model import ModelConfig


class LayoutError(ValueError):
    """A layout that cannot run; the message names the flag and what was expected."""


@dataclass(frozen=True)
class Layout:
    nodes: int = 1
    gpus_per_node: int = 8
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    sequence_parallel: bool = False
    zero_stage: int = 0
    offload_optimizer: bool = False
    offload_param: bool = False
    micro_batch_size: int = 1
    seq_length: int = 256
    bf16: bool = True
    recompute_activations: bool = False
    norm_impl: str = "triton"  # what --norm-impl auto runs on CUDA

    @property
    def world_size(self) -> int:
        return self.nodes * self.gpus_per_node

    @property
    def data_parallel_size(self) -> int:
        return self.world_size // (self.tensor_model_parallel_size * self.pipeline_model_parallel_size)

    def replace(self, **changes) -> "Layout":
        return replace(self, **changes)


def check_layout(layout: Layout, model: ModelConfig, global_batch_size: int | None = None) -> None:
    """Raise LayoutError (one line naming the flag) for a layout that cannot be built: the trainer's own
    start-up checks (megatron_mixln.training.startup_checks), then what only a cluster shape decides."""
    from megatron_mixln.training.config import UsageError
    from megatron_mixln.training.startup_checks import check_startup_layout

    tp, pp = layout.tensor_model_parallel_size, layout.pipeline_model_parallel_size
    for flag, value in (("--nodes", layout.nodes), ("--gpus-per-node", layout.gpus_per_node),
                        ("--tensor-model-parallel-size", tp), ("--pipeline-model-parallel-size", pp),
                        ("--micro-batch-size", layout.micro_batch_size), ("--seq-length", layout.seq_length)):
        if not isinstance(value, int) or value < 1:
            raise LayoutError(f"{flag}: must be a positive integer, got {value!r}")
    if layout.zero_stage not in (0, 1, 2, 3):
        raise LayoutError(f"--zero-stage: must be 0, 1, 2 or 3, got {layout.zero_stage!r}")
    try:
        check_startup_layout(model.replace(seq_length=layout.seq_length), layout.world_size,
                             tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                             sequence_parallel=layout.sequence_parallel, zero_stage=layout.zero_stage,
                             micro_batch_size=layout.micro_batch_size, global_batch_size=global_batch_size)
    except UsageError as exc:
        raise LayoutError(f"{exc} (world size {layout.world_size} = --nodes {layout.nodes} x --gpus-per-node "
                          f"{layout.gpus_per_node})") from None
    if tp > layout.gpus_per_node:
        raise LayoutError(f"--tensor-model-parallel-size {tp}: larger than --gpus-per-node {layout.gpus_per_node} "
                          "(tensor parallelism stays inside a node)")
    if layout.offload_param and layout.zero_stage != 3:
        raise LayoutError(f"--offload-param: needs --zero-stage 3, got {layout.zero_stage}")
    if layout.offload_optimizer and layout.zero_stage == 0:
        raise LayoutError("--offload-optimizer: needs --zero-stage 1, 2 or 3 (ZeRO-Offload), got 0")
