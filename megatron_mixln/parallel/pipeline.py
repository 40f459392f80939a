"""Pipeline parallelism with DeepSpeed's pipeline engine (1F1B over micro-batches).

The model becomes a flat list of layers, each mapping one tensor to the next:

    layer 0        EmbeddingPipe   tokens -> h          (keys: embed.weight, embed_scale.weight)
    layers 1..L    Block(config, l) h -> h               (its own position, global 1-based layer_number l)
    layer L+1      HeadPipe        h -> logits          (keys: final_norm.*, lm_head.weight (, lm_head.bias))

Two-stream positions (siamese, residual-dual) pass the pair of residual streams (x, y) instead of h
(x: the post-norm stream, y: SiameseNorm's pre-norm / ResiDual's dual stream). A stage boundary
carries both packed into ONE tensor, `torch.stack((x, y))` of shape (2, batch, seq, hidden), unpacked
by the next stage's first block (see `_pack_two_streams_at_stage_boundaries`): the payload doubles.

Each Block is built with its real global `layer_number`, so LNS's 1/sqrt(l), DeepNorm's alpha (which
depends on the total L) and the Mix-LN schedule are those of the unsplit model on every stage.
DeepSpeed writes one checkpoint file per layer index (`layer_XX-model_YY-model_states.pt`), so the
on-disk layout does not depend on how the layers were partitioned into stages.
"""
from __future__ import annotations

import copy
import functools
import os

import torch
from torch import nn

from megatron_mixln.model.block import Block, plan_residual_handoff, resolve_stream
from megatron_mixln.model.init import init_weights, make_lm_head
from megatron_mixln.model.transformer import make_embedding_scale
from megatron_mixln.model.two_stream import make_final_norm, stream_count
from megatron_mixln.parallel.cross_entropy import vocab_parallel_lm_loss
from megatron_mixln.parallel.mappings import gather_from_sequence, scatter_to_sequence
from megatron_mixln.parallel.sequence_parallel import mark_sequence_parallel_params
from megatron_mixln.parallel.tensor_parallel import (
    check_tensor_parallel_config, parallelize_block, parallelize_embedding, parallelize_lm_head,
)

PARTITION_METHODS = ("parameters", "uniform")


class EmbeddingPipe(nn.Module):
    """The embedding (times the learnable scale with --learnable-embedding-scale) as a stage layer."""

    def __init__(self, config):
        super().__init__()
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        self.embed_scale = make_embedding_scale(config)

    def forward(self, tokens):
        h = self.embed(tokens)
        return h if self.embed_scale is None else self.embed_scale(h)


class HeadPipe(nn.Module):
    """Final norm + LM head as one stage layer (keys match the plain model's)."""

    def __init__(self, config):
        super().__init__()
        self.final_norm = make_final_norm(config)
        self.lm_head = make_lm_head(config)

    def forward(self, h):
        """h: a tensor, or the last block's handed-off (h, d) pair: the final norm does that add."""
        return self.lm_head(resolve_stream(h, self.final_norm))


def check_pipeline_config(config, pp_size: int, partition_method: str) -> None:
    if partition_method not in PARTITION_METHODS:
        raise ValueError(f"partition_method: unknown {partition_method!r}; allowed: {', '.join(PARTITION_METHODS)}")
    if pp_size == 1:
        return
    if config.tie_embeddings:
        raise ValueError(
            "--tie-embeddings with --pipeline-model-parallel-size > 1 is not supported: the embedding "
            "and the LM head live on different stages (untie them, or use PP=1)"
        )
    if config.num_layers < pp_size:
        raise ValueError(
            f"num_layers={config.num_layers} < --pipeline-model-parallel-size={pp_size}: "
            "a pipeline stage would have no transformer layer"
        )
    if partition_method == "uniform" and config.num_layers % pp_size:
        raise ValueError(
            f"num_layers={config.num_layers} is not divisible by --pipeline-model-parallel-size={pp_size} "
            "(uniform partitioning puts the same number of layers on every stage)"
        )


def check_deepspeed_config(ds_config: dict, state, sequence_parallel: bool = False) -> dict:
    """Validate a DeepSpeed config against the layout (ZeRO-2/3 with PP: a clear error here, before
    DeepSpeed's assert); returns a copy. `sequence_parallel` needs nothing: stage boundaries carry
    whole sequences (see `_sequence_parallel_stage_boundaries`), so DeepSpeed's own TP split of
    stage-to-stage activations (pipeline.pipe_partitioned, on by default) stays valid."""
    cfg = copy.deepcopy(ds_config)
    stage = int(cfg.get("zero_optimization", {}).get("stage", 0))
    if state.pp_size > 1 and stage >= 2:
        raise ValueError(
            f"--zero-stage={stage} cannot be combined with --pipeline-model-parallel-size={state.pp_size}: "
            "DeepSpeed's pipeline engine supports ZeRO stage 0 or 1 only (use --zero-stage 1, or PP=1)"
        )
    return cfg


def layer_specs(config):
    from deepspeed.pipe import LayerSpec

    return (
        [LayerSpec(EmbeddingPipe, config)]
        + [LayerSpec(Block, config, n) for n in range(1, config.num_layers + 1)]
        + [LayerSpec(HeadPipe, config)]
    )


def stage_partition(config, pp_size: int, partition_method: str) -> list[int]:
    """Stage boundaries over the L+2 layers (DeepSpeed's `parts`): stage s owns [parts[s], parts[s+1])."""
    L = config.num_layers
    if partition_method == "uniform":  # the same number of blocks per stage; embedding first, head last
        per = L // pp_size
        return [0] + [1 + per * s for s in range(1, pp_size)] + [L + 2]
    from deepspeed.runtime.utils import partition_balanced

    with torch.device("meta"):  # count parameters without allocating them
        counts = [sum(p.numel() for p in m.parameters()) for m in
                  [EmbeddingPipe(config)] + [Block(config, n) for n in range(1, L + 1)] + [HeadPipe(config)]]
    parts = partition_balanced(counts, pp_size)
    for s in range(pp_size):
        if parts[s + 1] <= parts[s] or not any(1 <= i <= L for i in range(parts[s], parts[s + 1])):
            raise ValueError(
                f"pipeline partition {parts} (by parameter count) leaves stage {s} without a transformer layer; "
                "use partition_method='uniform' or fewer stages"
            )
    return parts


class _InitView:
    """What `init_weights` reads from a Transformer, backed by one stage's layers plus throw-away
    full-size stand-ins for the others, so the random stream is consumed exactly as for the whole model."""

    def __init__(self, config, local: dict):
        self.config, self._local = config, local

    def _scratch(self, make):
        with torch.device("meta"):
            module = make()
        return module.to_empty(device="cpu")

    def _get(self, key, make):
        module = self._local.get(key)
        return module if module is not None else self._scratch(make)

    @property
    def embed(self):
        return self._get("embed", lambda: nn.Embedding(self.config.vocab_size, self.config.hidden_size))

    @property
    def lm_head(self):
        return self._get("lm_head", lambda: make_lm_head(self.config))

    @property
    def layers(self):
        for n in range(1, self.config.num_layers + 1):
            yield self._get(n, lambda: Block(self.config, n))

    def modules(self):
        for m in self._local.values():
            if m is not None:
                yield from m.modules()


@torch.no_grad()
def init_stage_like_full_model(local: dict, config, seed: int) -> None:
    """Initialise this stage's (full-size, CPU) layers exactly as `init_weights` initialises the whole
    model after seeding: i.e. as `m = build_model(config, "meta"); m.to_empty(device="cpu");
    torch.manual_seed(seed); init_weights(m)`. The global RNG state is left untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        init_weights(_InitView(config, local))


def _pipeline_module_class():
    """Created lazily, so importing this file does not import DeepSpeed."""
    from deepspeed.pipe import PipelineModule

    class _MixLNPipelineModule(PipelineModule):
        """A PipelineModule whose stage boundaries come from `stage_partition` (checked up front) and
        whose freshly built layers are initialised and sharded while still on the CPU, before
        PipelineModule moves them to the accelerator."""

        def __init__(self, *args, parts, after_build, **kwargs):
            self.__dict__["_mixln_parts"] = list(parts)
            self.__dict__["_mixln_after_build"] = after_build
            super().__init__(*args, **kwargs)

        def _partition_layers(self, method="uniform"):
            self.parts = list(self.__dict__["_mixln_parts"])
            stage = self._topo.get_coord(self.global_rank).pipe
            self._set_bounds(start=self.parts[stage], stop=self.parts[stage + 1])

        def _build(self):
            super()._build()
            self.__dict__["_mixln_after_build"](self)
            for p in self.parameters():
                p.ds_pipe_replicated = False

    return _MixLNPipelineModule


def local_layers(pipe) -> dict:
    """{global layer index: module} for the layers built on this stage."""
    return {int(name): module for name, module in pipe.named_children() if name.isdigit()}


def plan_stage_residual_handoff(layers: dict, config) -> None:
    """Cross-block fusion inside one stage: blocks hand their last add on as in the whole model, but
    a stage's last block does so only when the head (final norm) is on the same stage; otherwise it
    sends a plain tensor, so stage-to-stage traffic (and SP's gather at the boundary) is unchanged."""
    if not config.cross_block_fusion:
        return
    ordered = [m for _, m in sorted(layers.items())]
    blocks = [m for m in ordered if isinstance(m, Block)]
    plan_residual_handoff(blocks, then_norm=config.final_norm and isinstance(ordered[-1], HeadPipe))


def _init_and_shard_stage(pipe, model_config, state, sequence_parallel: bool, seed: int) -> None:
    _check_same_groups(pipe, state)
    layers = local_layers(pipe)
    plan_stage_residual_handoff(layers, model_config)
    local = {}
    for module in layers.values():
        if isinstance(module, EmbeddingPipe):
            local["embed"], local["embed_scale"] = module.embed, module.embed_scale
        elif isinstance(module, HeadPipe):
            local["lm_head"], local["final_norm"] = module.lm_head, module.final_norm
        else:
            local[module.layer_number] = module
    init_stage_like_full_model(local, model_config, seed)
    if state.tp_size > 1:
        _shard_stage(pipe, layers, state, sequence_parallel)
    if stream_count(model_config.positions) == 2:
        _pack_two_streams_at_stage_boundaries(layers)


def _shard_stage(pipe, layers: dict, state, sequence_parallel: bool) -> None:
    for module in layers.values():
        if isinstance(module, EmbeddingPipe):
            module.embed = parallelize_embedding(module.embed, state, sequence_parallel)
        elif isinstance(module, HeadPipe):
            module.lm_head = parallelize_lm_head(module.lm_head, state, sequence_parallel)
        else:
            parallelize_block(module, state, sequence_parallel)
    if sequence_parallel:
        mark_sequence_parallel_params(pipe, state)
        _sequence_parallel_stage_boundaries(layers, state)


def _pack_two_streams_at_stage_boundaries(layers: dict) -> None:
    """A two-stream stage sends (x, y) as one tensor torch.stack((x, y)), (2, batch, seq, hidden), and
    the next stage's first block unbinds it. Not DeepSpeed's tuple of tensors: with TP its pipeline
    engine (pipe_partitioned) carries a gradient back for the first tensor of a tuple only. The pack
    runs after SP's gather of each stream, the unpack before SP's scatter (hook order)."""
    first, last = min(layers), max(layers)
    if not isinstance(layers[first], EmbeddingPipe):
        layers[first].register_forward_pre_hook(lambda m, args: (tuple(args[0].unbind(0)),) + args[1:],
                                                prepend=True)
    if not isinstance(layers[last], HeadPipe):
        layers[last].register_forward_hook(lambda m, args, out: torch.stack(out))


def _sequence_parallel_stage_boundaries(layers: dict, state) -> None:
    """Under SP, send whole sequences between stages: gather the shards at the end of a stage, keep
    this rank's shard again at the start of the next.

    DeepSpeed's pipeline engine (pipe_partitioned, its default with TP) sends each TP rank 1/tp of
    the flattened activation and all-gathers it on the receiving side, assuming the activation is
    the same on every TP rank. Sequence shards are not, so sending them as they are would mix the
    ranks' shards. Gathered, they are replicated and that split is exact (and as cheap as sending
    the shards). The gradient coming back is replicated too, so the gather's backward keeps this
    rank's slice rather than reduce-scattering.
    """
    group = state.tp_group
    first, last = min(layers), max(layers)

    def each_stream(fn, h):  # a tensor, or a two-stream pair (x, y): both streams cross the boundary
        return tuple(fn(t) for t in h) if isinstance(h, tuple) else fn(h)

    def gather(t):
        return gather_from_sequence(t, group, partial_grads=False)

    if not isinstance(layers[first], EmbeddingPipe):
        layers[first].register_forward_pre_hook(
            lambda m, args: (each_stream(lambda t: scatter_to_sequence(t, group), args[0]),) + args[1:])
    if not isinstance(layers[last], HeadPipe):
        layers[last].register_forward_hook(lambda m, args, out: each_stream(gather, out))


def build_pipeline_module(
    model_config,
    state,
    loss_fn=None,
    partition_method: str = "parameters",
    activation_checkpoint_interval: int = 0,
    sequence_parallel: bool = False,
    seed: int | None = None,
):
    """A `deepspeed.pipe.PipelineModule` for this rank's stage, TP/SP applied to its layers.

    Pass it to `deepspeed.initialize(model=..., mpu=None, config=check_deepspeed_config(cfg, state, sp))`
    and train with `engine.train_batch(iter([(tokens, labels), ...]))` (one pair per micro-batch).
    `loss_fn(logits_shard, labels)` runs on the last stage on vocab-sharded logits; default (None): the
    mean vocab-parallel cross entropy over this layout's TP group. Weights are initialised as the
    whole model would be from `seed` (default: `torch.initial_seed()`, i.e. the last
    `torch.manual_seed`), see `init_stage_like_full_model`; or load a plain state dict afterwards
    with `load_plain_state_dict(pipe, state_dict, state)`.
    `partition_method`: "parameters" (balance parameter counts) or "uniform" (L/pp blocks per stage).
    """
    from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology

    check_tensor_parallel_config(model_config, state.tp_size, sequence_parallel)
    check_pipeline_config(model_config, state.pp_size, partition_method)
    if "LOCAL_RANK" not in os.environ:
        raise RuntimeError("build_pipeline_module: LOCAL_RANK is not set (start the job with deepspeed/torchrun)")
    parts = stage_partition(model_config, state.pp_size, partition_method)
    if loss_fn is None:
        loss_fn = functools.partial(vocab_parallel_lm_loss, group=state.tp_group if state.tp_size > 1 else None)
    seed = torch.initial_seed() if seed is None else seed
    pipe = _pipeline_module_class()(
        layers=layer_specs(model_config),
        topology=PipeModelDataParallelTopology(num_pp=state.pp_size, num_mp=state.tp_size, num_dp=state.dp_size),
        loss_fn=loss_fn,
        parts=parts,
        after_build=lambda p: _init_and_shard_stage(p, model_config, state, sequence_parallel, seed),
        activation_checkpoint_interval=activation_checkpoint_interval,
        # only blocks: a checkpointed embedding (integer input) would get no gradient
        checkpointable_layers=["Block"],
    )
    pipe.model_config, pipe.parallel_state, pipe.sequence_parallel = model_config, state, sequence_parallel
    return pipe


def _check_same_groups(pipe, state) -> None:
    """DeepSpeed's grid and our groups must agree (both use Megatron's rank order)."""
    grid = pipe._grid
    if state.tp_size > 1 and list(grid.slice_group) != list(state.tp_ranks):
        raise RuntimeError(f"pipeline grid TP ranks {grid.slice_group} != {list(state.tp_ranks)}")
    if list(grid.dp_group) != list(state.dp_ranks) or list(grid.pp_group) != list(state.pp_ranks):
        raise RuntimeError("pipeline grid DP/PP ranks differ from initialize_model_parallel's")


def pipeline_layer_grad_norms(pipe, state, get_grad) -> list[dict]:
    """`layer_grad_norms` of the whole model from its pipeline stages: each stage measures its own
    blocks, one all_gather over the pipeline group puts every layer's row on every rank, in
    layer order. Collective over the PP group (and over TP inside `get_grad` when it gathers shards)."""
    import torch.distributed as dist
    from types import SimpleNamespace

    from megatron_mixln.diagnostics import layer_grad_norms

    blocks = [m for _, m in sorted(local_layers(pipe).items()) if isinstance(m, Block)]
    rows = layer_grad_norms(SimpleNamespace(layers=blocks), get_grad)
    per_stage = [None] * state.pp_size
    dist.all_gather_object(per_stage, rows, group=state.pp_group)
    return sorted((row for stage in per_stage for row in stage), key=lambda row: row["layer"])
