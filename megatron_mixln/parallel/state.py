"""Process groups for tensor (TP), pipeline (PP) and data (DP) parallelism, in Megatron's rank order.

    rank = pp_rank * (dp * tp) + dp_rank * tp + tp_rank        (TP fastest, then DP, then PP)

TP ranks are neighbours (the chattiest groups get the closest devices); this is also the order of
DeepSpeed's `PipeModelDataParallelTopology` (axes pipe, data, model), so the groups built here and
the grid a `PipelineModule` builds for itself hold the same ranks.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch.distributed as dist

_STATE: "ParallelState | None" = None


def _rank_of(pp_rank: int, dp_rank: int, tp_rank: int, tp: int, dp: int) -> int:
    return pp_rank * dp * tp + dp_rank * tp + tp_rank


def check_parallel_sizes(world_size: int, tensor_model_parallel_size: int, pipeline_model_parallel_size: int) -> int:
    """Validate the layout against the world size; returns the data-parallel size."""
    tp, pp = tensor_model_parallel_size, pipeline_model_parallel_size
    for flag, value in (("--tensor-model-parallel-size", tp), ("--pipeline-model-parallel-size", pp)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{flag}: must be a positive integer, got {value!r}")
    if world_size % (tp * pp):
        raise ValueError(
            f"--tensor-model-parallel-size={tp} x --pipeline-model-parallel-size={pp} = {tp * pp} "
            f"does not divide the world size {world_size}"
        )
    return world_size // (tp * pp)


@dataclass
class ParallelState:
    """Where this rank sits in the TP x DP x PP grid, and the groups it belongs to."""

    tp_size: int
    pp_size: int
    dp_size: int
    tp_rank: int
    pp_rank: int
    dp_rank: int
    tp_group: object = field(repr=False)
    pp_group: object = field(repr=False)
    dp_group: object = field(repr=False)
    model_parallel_group: object = field(repr=False)  # TP x PP: the ranks that hold one model replica
    tp_ranks: tuple[int, ...] = ()
    pp_ranks: tuple[int, ...] = ()
    dp_ranks: tuple[int, ...] = ()
    model_parallel_ranks: tuple[int, ...] = ()

    @property
    def model_parallel_rank(self) -> int:
        return self.pp_rank * self.tp_size + self.tp_rank

    @property
    def mpu(self):
        """The object to pass as `deepspeed.initialize(mpu=...)`.

        None when pp_size > 1: DeepSpeed requires mpu=None for a `PipelineModule`, whose own grid
        (built by `build_pipeline_module` with the same rank order) plays that role.
        """
        return ModelParallelUnit(self) if self.pp_size == 1 else None


class ModelParallelUnit:
    """DeepSpeed's `mpu` protocol over a ParallelState.

    DeepSpeed 0.19.8 calls: get_{model,data,tensor_model,pipeline_model}_parallel_{rank,world_size,group},
    get_data_parallel_group_ranks, get_tensor_model_parallel_src_rank, and the older get_slice_parallel_*
    / get_pipe_parallel_* spellings (deepspeed/utils/bwc.py). ZeRO partitions over get_data_parallel_group
    only; gradient clipping sums norms over get_model_parallel_group (TP x PP), counting replicated
    parameters on model-parallel rank 0 only and TP shards (`param.tensor_model_parallel`) everywhere.

    Deliberately absent: get_sequence_parallel_* / initialize_sequence_parallel. DeepSpeed reads those
    as *Ulysses* sequence parallelism (it would fold them into its data-parallel group); Megatron-style
    sequence parallelism lives entirely inside the TP group and DeepSpeed needs to know nothing about it.
    """

    def __init__(self, state: ParallelState):
        self.state = state

    # model parallel = TP x PP (Megatron's meaning, and DeepSpeed's checkpoint "mp_rank")
    def get_model_parallel_rank(self):
        return self.state.model_parallel_rank

    def get_model_parallel_world_size(self):
        return self.state.tp_size * self.state.pp_size

    def get_model_parallel_group(self):
        return self.state.model_parallel_group

    def get_data_parallel_rank(self):
        return self.state.dp_rank

    def get_data_parallel_world_size(self):
        return self.state.dp_size

    def get_data_parallel_group(self):
        return self.state.dp_group

    def get_data_parallel_group_ranks(self):
        return list(self.state.dp_ranks)

    def get_tensor_model_parallel_rank(self):
        return self.state.tp_rank

    def get_tensor_model_parallel_world_size(self):
        return self.state.tp_size

    def get_tensor_model_parallel_group(self):
        return self.state.tp_group

    def get_tensor_model_parallel_src_rank(self):
        return self.state.tp_ranks[0]

    def get_pipeline_model_parallel_rank(self):
        return self.state.pp_rank

    def get_pipeline_model_parallel_world_size(self):
        return self.state.pp_size

    def get_pipeline_model_parallel_group(self):
        return self.state.pp_group

    # older DeepSpeed spellings
    get_slice_parallel_rank = get_tensor_model_parallel_rank
    get_slice_parallel_world_size = get_tensor_model_parallel_world_size
    get_slice_parallel_group = get_tensor_model_parallel_group
    get_pipe_parallel_rank = get_pipeline_model_parallel_rank
    get_pipe_parallel_world_size = get_pipeline_model_parallel_world_size
    get_pipe_parallel_group = get_pipeline_model_parallel_group


def initialize_model_parallel(tensor_model_parallel_size: int = 1,
                              pipeline_model_parallel_size: int = 1) -> ParallelState:
    """Build every TP, DP, PP and model-parallel group (all ranks must call this, in the same order)."""
    global _STATE
    if not dist.is_initialized():
        raise RuntimeError("initialize_model_parallel: torch.distributed is not initialized")
    world, rank = dist.get_world_size(), dist.get_rank()
    tp, pp = tensor_model_parallel_size, pipeline_model_parallel_size
    dp = check_parallel_sizes(world, tp, pp)
    mine = {}

    def build(kind, ranks):
        group = dist.new_group(ranks=list(ranks))  # collective: every rank creates every group
        if rank in ranks:
            mine[kind] = (group, tuple(ranks))

    for p in range(pp):
        for d in range(dp):
            build("tp", [_rank_of(p, d, t, tp, dp) for t in range(tp)])
    for p in range(pp):
        for t in range(tp):
            build("dp", [_rank_of(p, d, t, tp, dp) for d in range(dp)])
    for d in range(dp):
        for t in range(tp):
            build("pp", [_rank_of(p, d, t, tp, dp) for p in range(pp)])
    for d in range(dp):
        build("mp", sorted(_rank_of(p, d, t, tp, dp) for p in range(pp) for t in range(tp)))

    _STATE = ParallelState(
        tp_size=tp, pp_size=pp, dp_size=dp,
        tp_rank=rank % tp, dp_rank=(rank // tp) % dp, pp_rank=rank // (tp * dp),
        tp_group=mine["tp"][0], pp_group=mine["pp"][0], dp_group=mine["dp"][0],
        model_parallel_group=mine["mp"][0],
        tp_ranks=mine["tp"][1], pp_ranks=mine["pp"][1], dp_ranks=mine["dp"][1], model_parallel_ranks=mine["mp"][1],
    )
    return _STATE


def get_parallel_state() -> ParallelState | None:
    """The state from the last `initialize_model_parallel` (None before it: everything runs unsharded)."""
    return _STATE


def destroy_model_parallel() -> None:
    """Forget the global state (groups are freed with the default process group)."""
    global _STATE
    _STATE = None
