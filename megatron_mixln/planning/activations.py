"""Bytes a transformer block saves for backward, per micro-batch and GPU, for each norm position.

Derived from the block's forward (megatron_mixln/model/block.py, attention.py, mlp.py and the add+norm
implementations in kernels/), b = micro-batch, s = sequence, h = hidden, f = ffn, a = query heads,
g = key/value heads, d = head dim, e = bytes of an activation (2 in bf16, 4 in fp32), t = TP size:

    linear inputs      e*b*s*h   attention input (shared by q, k, v)   + e*b*s*h   MLP input (gate, up)
    attention          e*b*s*h/t * (2 + 2g/a)   q, k after RoPE, v, output (= o_proj input, same storage)
                       + 4*b*(a/t)*s            flash-attention log-sum-exp (fp32)
                       + 2*4*s*d                RoPE cos and sin tables (fp32)
    SwiGLU             4*e*b*s*f/t              gate output, silu(gate), up output, their product
    one norm, torch    (8*b*s*h + 4*b*s)        the fp32 sum s and s*rstd, and rstd
                       (+ 4*h in bf16: the gain cast to fp32)
    one norm, triton   (e*b*s*h + 4*b*s)        its input (or the residual sum) and rstd (+ 4*b*s mean, LayerNorm)

    one DyT norm       torch: 8*b*s*h (the sum and tanh) / Derf 12*b*s*h (+ erf's argument); no rstd;
                       (+ 4*h + 4 in bf16: gain and alpha cast to fp32); triton: e*b*s*h (the sum)
    one q/k/v norm     torch only: 8*E (12*E Derf) + 4*rows (statistic kinds: rstd per head, or per token
                       for --qk-norm full) (+ 4*gain + 4 (pointwise) in bf16), E = b*s*heads*d/t, heads
                       a for q, g for k and v; the whole sequence under SP

pre, lns, post, deepnorm, deeppost, residual-dual, reordered and hybrid-first layers have two residual-stream
norms; peri layers four, siamese six (--siamese-variant hybrid_pre: four, and its c1 * x saves x, e*b*s*h,
counted with the norms), hybrid one (model.block.norms_per_layer); hybrid layers norm q, k and v. Post-like layers save
different tensors from pre layers (the raw layer input feeds attention and the normalised sums feed the
next sublayer, where a pre layer keeps its normalised copies) but the same number of bytes; peri layers
keep two more normalised tensors. Scalars (LNS's 1/sqrt(l), DeepNorm's a) are Python numbers and save
nothing. Under sequence parallelism the norms run on s/t tokens; the linears' inputs are the gathered
sequence, so they stay whole (this project's SP saves the gathered input).

The tests check every term against the bytes autograd saves (each position, fp32/bf16, TP 1 and 2 with
and without SP, the PyTorch and the Triton norm paths -- Triton interpreted on CPU -- and against the CUDA
allocator when a GPU is present).

With --recompute-activations a block keeps only its input (e*b*s*h, /t under SP) and one block's
activations are alive again while it is recomputed in backward.

Two-stream positions (siamese, residual-dual) double the residual path: every layer after the first
takes two streams (x, y) as input, so with recomputation each keeps 2*e*b*s*h (the first layer's
input is the embedding alone); without it the adds of the second stream save nothing (a sum of two
tensors needs neither for its backward), and SiameseNorm's extra norms are counted as norms. The
final norms: three for SiameseNorm, one for ResiDual (whose head input x + N(d) is the LM-head input). The LM head keeps the final norm's
tensors, its input and the fp32 log-softmax of the logits (4*b*s*V/t), plus int64 labels.

The embedding saves nothing but its int64 indices (counted with the labels), except that the learnable
embedding scale (--learnable-embedding-scale, h = embed(tokens) * scale) keeps the embedding output for the
scale's gradient: e*b*s*h (/t under SP, where the embedding output is already this rank's sequence shard),
on the first pipeline stage, recomputation or not.
"""
from __future__ import annotations

from megatron_mixln.model import ModelConfig
from megatron_mixln.model.block import norms_per_layer, scales_per_layer
from megatron_mixln.model.two_stream import final_norm_count, stream_count


def _norm_bytes(impl: str, kind: str, tokens: int, h: int, e: int, sp: int) -> int:
    if kind in ("dyt", "derf"):
        if impl == "torch":
            return (8 if kind == "dyt" else 12) * tokens * h // sp + (4 * h + 4 if e != 4 else 0)
        return e * tokens * h // sp
    if impl == "torch":
        return (8 * tokens * h + 4 * tokens) // sp + (4 * h if e != 4 else 0)
    if impl in ("triton", "apex"):
        return (e * tokens * h + 4 * tokens * (2 if kind == "layernorm" else 1)) // sp
    raise ValueError(f"norm_impl: {impl!r} has no activation formula; use torch or triton")


def _qkv_norm_bytes(model: ModelConfig, position: str, tokens: int, e: int, tp: int) -> int:
    """The q/k(/v) norms of one layer (QKNorm: always the PyTorch path, inside the TP region)."""
    from megatron_mixln.model.positions import QKV_NORM_POSITIONS

    hybrid = position in QKV_NORM_POSITIONS
    mode = "head" if hybrid else model.qk_norm
    if mode == "none":
        return 0
    kind, d = model.norm_kind, model.head_dim
    pointwise = kind in ("dyt", "derf")
    total = 0
    for heads in [model.num_attention_heads, model.num_query_groups] + ([model.num_query_groups] if hybrid else []):
        elems = tokens * heads * d // tp
        rows = 0 if pointwise else tokens * (1 if mode == "full" else heads // tp)
        gain = heads * d // tp if mode == "full" or model.qk_norm_per_head_gain else d  # this rank's slice
        total += (12 if kind == "derf" else 8) * elems + 4 * rows + (4 * gain + (4 if pointwise else 0) if e != 4 else 0)
    return total


def block_activation_bytes(model: ModelConfig, position: str, micro_batch: int, seq: int, bf16: bool = True,
                           impl: str = "triton", tp: int = 1, sequence_parallel: bool = False,
                           first: bool = False) -> dict[str, int]:
    """Saved-for-backward bytes of one block, by part: {'norms', 'linear_inputs', 'attention', 'mlp'}.
    `first`: the model's first layer (a siamese first layer starts both streams from the embedding, so
    its x and y norms -- hybrid_pre: c1 * x and the y norm -- save the same tensor when a norm saves its
    input as it is: Triton, or fp32 torch). 'norms' includes hybrid_pre's c1 * x, which saves x."""
    e = 2 if bf16 else 4
    tokens, h, f = micro_batch * seq, model.hidden_size, model.ffn_hidden_size
    a, g, d = model.num_attention_heads, model.num_query_groups, model.head_dim
    sp = tp if sequence_parallel else 1
    shared = e * tokens * h // sp if first and position == "siamese" and (impl != "torch" or e == 4) else 0
    variant = model.siamese_variant
    return {
        "norms": norms_per_layer(position, variant) * _norm_bytes(impl, model.norm_kind, tokens, h, e, sp)
                 + scales_per_layer(position, variant) * e * tokens * h // sp - shared
                 + _qkv_norm_bytes(model, position, tokens, e, tp),
        "linear_inputs": 2 * e * tokens * h,
        "attention": e * tokens * h * (2 * a + 2 * g) // (a * tp) + 4 * micro_batch * (a // tp) * seq + 8 * seq * d,
        "mlp": 4 * e * tokens * f // tp,
    }


def head_activation_bytes(model: ModelConfig, micro_batch: int, seq: int, bf16: bool = True, impl: str = "triton",
                          tp: int = 1, sequence_parallel: bool = False) -> int:
    """Final norm (if any) + LM-head input + fp32 log-softmax of the logits + int64 tokens and labels."""
    e = 2 if bf16 else 4
    tokens = micro_batch * seq
    sp = tp if sequence_parallel else 1
    final = final_norm_count(model) * _norm_bytes(impl, model.norm_kind, tokens, model.hidden_size, e, sp)
    return final + e * tokens * model.hidden_size + 4 * tokens * model.vocab_size // tp + 8 * (2 * tokens + micro_batch)


def activation_bytes(model: ModelConfig, micro_batch: int, seq: int, bf16: bool = True, impl: str = "triton",
                     recompute: bool = False, tp: int = 1, sequence_parallel: bool = False,
                     layers: range | None = None, with_head: bool = True) -> dict[str, int]:
    """Activation bytes of one micro-batch over `layers` (default: all), per GPU.

    -> {'embedding': the embedding scale's saved input (when `layers` starts the model), 'blocks': saved by the
    blocks, 'recompute_peak': one block alive again in backward (0 without recompute), 'head': LM head and
    loss, 'total'}.
    """
    layers = range(model.num_layers) if layers is None else layers
    e = 2 if bf16 else 4
    sp = tp if sequence_parallel else 1
    scaled = model.learnable_embedding_scale and 0 in layers
    embedding = e * micro_batch * seq * model.hidden_size // sp if scaled else 0
    per_block = [sum(block_activation_bytes(model, model.positions[i], micro_batch, seq, bf16, impl, tp,
                                            sequence_parallel, first=i == 0).values()) for i in layers]
    if recompute:  # each block keeps its input: one tensor, or two streams after the first layer
        inputs = sum(1 if i == 0 else stream_count(model.positions) for i in layers)
        blocks = inputs * e * micro_batch * seq * model.hidden_size // sp
        peak = max(per_block, default=0)
    else:
        blocks, peak = sum(per_block), 0
    head = head_activation_bytes(model, micro_batch, seq, bf16, impl, tp, sequence_parallel) if with_head else 0
    return {"embedding": embedding, "blocks": blocks, "recompute_peak": peak, "head": head,
            "total": embedding + blocks + peak + head}
