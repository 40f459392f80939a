"""Bytes of parameters, gradients and optimizer states per GPU (and per node on CPU) under ZeRO 0-3.

Mixed precision as DeepSpeed runs it with Adam (bf16): 16-bit weights and gradients, and an fp32
master copy, fp32 gradients and fp32 Adam m and v. Per parameter, in bytes:

    stage      16-bit weights  16-bit grads  fp32 master + m + v  fp32 grads
    0          2               2             12                   4
    1, 2       2               2/N           12/N                 4/N
    3          2/N             2/N           12/N                 4/N        + 4 x largest layer (gathered)

N = data-parallel size (ZeRO partitions over it). Stages 1 and 2 hold the same partitions in DeepSpeed
(one code path; stage 1 only reduces at the accumulation boundary). These sums are DeepSpeed's own
estimators' (deepspeed.runtime.zero.stage_1_and_2.estimate_zero2_model_states_mem_needs:
2P + 18P/N, exactly ours for stages 1-2). For stage 3 DeepSpeed's estimator
(stage3.estimate_zero3_model_states_mem_needs: 4 x largest layer + 18P/N) leaves out the 16-bit
gradient partition, a flat buffer its stage-3 optimizer keeps for the whole run: ours is 2P/N more.
The tests check every column against the tensors of a real engine (bf16 and fp32, 2 ranks). With --offload-optimizer the fp32 states and the
gradient partitions (as fp32) live in pinned CPU memory, 16 bytes per parameter per rank's share;
with --offload-param the 16-bit weight partitions too (18).
Without --bf16 (fp32 training) stage 0 has no master copy (4 + 4 + 8 bytes); ZeRO 1-3 still keep their
own fp32 flat partition and its gradient, so the table holds with 4-byte weights and gradients.
"""
from __future__ import annotations

from dataclasses import dataclass

from megatron_mixln.model import ModelConfig
from megatron_mixln.model.block import norms_per_layer, scales_per_layer
from megatron_mixln.model.two_stream import final_norm_count
from megatron_mixln.planning.layout import Layout


def norm_param_count(model: ModelConfig, size: int) -> int:
    """One norm over `size` channels: gain (+ bias for LayerNorm, Derf, DyT with --dyt-bias) + the pointwise
    kinds' scalar alpha (+ Derf's shift)."""
    kind = model.norm_kind
    bias = kind in ("layernorm", "derf") or (kind == "dyt" and model.dyt_bias)
    return size * (2 if bias else 1) + (1 if kind in ("dyt", "derf") else 0) + (1 if kind == "derf" else 0)


def layer_norm_param_count(model: ModelConfig, position: str) -> int:
    """All norm parameters of one layer (whole on every TP rank): its residual-stream norms and its q/k(/v) norms."""
    from megatron_mixln.model.positions import QKV_NORM_POSITIONS

    n = norms_per_layer(position, model.siamese_variant) * norm_param_count(model, model.hidden_size)
    hybrid = position in QKV_NORM_POSITIONS
    mode = "head" if hybrid else model.qk_norm
    if mode != "none":
        hd = model.head_dim
        heads = [model.num_attention_heads, model.num_query_groups] + ([model.num_query_groups] if hybrid else [])
        n += sum(norm_param_count(model, h * hd if mode == "full" or model.qk_norm_per_head_gain else hd)
                 for h in heads)
    return n


def layer_param_counts(model: ModelConfig, tp: int = 1) -> dict[str, int]:
    """Parameters of one transformer block on one TP rank, by module (norms are not split). Linear biases:
    q/k/v and gate/up biases are split with their rows; o/down biases are whole on every rank."""
    h, f, hd = model.hidden_size, model.ffn_hidden_size, model.head_dim
    qkv_bias, bias = int(model.qkv_bias), int(model.add_bias_linear)
    q = (h + qkv_bias) * model.num_attention_heads * hd // tp
    kv = (h + qkv_bias) * model.num_query_groups * hd // tp
    o = h * model.num_attention_heads * hd // tp + bias * h
    norm = norm_param_count(model, h)
    return {"q_proj": q, "k_proj": kv, "v_proj": kv, "o_proj": o, "gate_proj": (h + bias) * f // tp,
            "up_proj": (h + bias) * f // tp, "down_proj": h * f // tp + bias * h, "norm": norm}


def param_counts(model: ModelConfig, tp: int = 1, pp: int = 1) -> dict[str, int]:
    """{'total', 'rank', 'largest_layer'}: the whole model (with --learnable-embedding-scale's one scalar),
    one rank's share on the fullest pipeline stage, and the largest single module there (DeepSpeed's
    "largest layer": the most parameters any module owns directly; under ZeRO-3 it is gathered whole)."""
    per_layer = layer_param_counts(model, tp)
    v = model.siamese_variant  # norm parameters (q/k/v norms, DyT scalars too), plus hybrid_pre's c1 (hidden gains)
    layer_norm_params = [layer_norm_param_count(model, p) + scales_per_layer(p, v) * model.hidden_size
                         for p in model.positions]
    layer_params = [sum(v for k, v in per_layer.items() if k != "norm") + n for n in layer_norm_params]
    vocab = model.vocab_size * model.hidden_size // tp
    scale = 1 if model.learnable_embedding_scale else 0  # whole on every TP rank, on the first stage
    final = final_norm_count(model) * per_layer["norm"]
    head_bias = model.vocab_size // tp if model.add_output_layer_bias else 0  # split with the vocabulary rows
    head = (0 if model.tie_embeddings else vocab) + head_bias
    per_stage = model.num_layers // pp
    stages = []
    for s in range(pp):
        n = sum(layer_params[s * per_stage:(s + 1) * per_stage])
        if s == 0:
            n += vocab + scale
        if s == pp - 1:
            n += final + (vocab if (head - head_bias or pp > 1) else 0) + head_bias
        stages.append(n)
    total_full = sum(layer_param_counts(model, 1)[k] for k in per_layer if k != "norm") * model.num_layers
    total_full += sum(layer_norm_params) + model.vocab_size * model.hidden_size * (1 if model.tie_embeddings else 2)
    total_full += final + scale + model.vocab_size * int(model.add_output_layer_bias)
    return {"total": total_full, "rank": max(stages),
            "largest_layer": max(vocab + head_bias, max(v for k, v in per_layer.items() if k != "norm"))}


@dataclass
class ModelStates:
    """Bytes per GPU by kind, and bytes in CPU memory per rank (offload)."""
    weights: int
    grads: int
    optimizer: int  # fp32 master + Adam m, v (or Adam m, v alone in fp32 training)
    fp32_grads: int
    gathered: int  # ZeRO-3: the largest layer gathered whole (16-bit weight + gradient)
    cpu_per_rank: int  # what offload puts in (pinned) host memory, per GPU process

    @property
    def gpu(self) -> int:
        return self.weights + self.grads + self.optimizer + self.fp32_grads + self.gathered


def model_states(model: ModelConfig, layout: Layout) -> ModelStates:
    counts = param_counts(model, layout.tensor_model_parallel_size, layout.pipeline_model_parallel_size)
    p, n, stage = counts["rank"], layout.data_parallel_size, layout.zero_stage
    w = 2 if layout.bf16 else 4
    shard = p if stage == 0 else p / n
    weights = w * (p / n if stage == 3 else p)
    grads = w * (p if stage == 0 else p / n)
    if layout.bf16:
        optimizer, fp32_grads = 12 * shard, 4 * shard
    else:
        optimizer, fp32_grads = (8 * shard, 0) if stage == 0 else (12 * shard, 4 * shard)
    gathered = 2 * w * counts["largest_layer"] if stage == 3 else 0
    cpu = 0
    if layout.offload_optimizer:
        cpu += optimizer + fp32_grads  # gradient partitions are copied out as fp32 into pinned CPU buffers
        optimizer = fp32_grads = grads = 0
    if layout.offload_param:
        cpu += weights
        weights = 0
    return ModelStates(int(weights), int(grads), int(optimizer), int(fp32_grads), int(gathered), int(cpu))
