"""Instability probes measured during one training step: activation growth, attention-logit growth,
output-logit divergence and update sizes, per layer (see docs/diagnostics.md).

    probe = StabilityProbe(model, ("activations", "attention", "logits", "updates"), layout)
    with probe:                      # forward hooks + a snapshot of the weights
        <one training step>          # the hooks read the step's own first micro-batch
    values = probe.results()         # collective; {"act_rms_in/layer_01": ..., "z_max": ..., ...}

Everything is measured on the first micro-batch this rank's pipeline/data-parallel replica runs in
the step (data-parallel rank 0's is the one rank 0 logs). Hooks run under no_grad on detached
tensors and draw no random numbers, so the step computes exactly what it computes without them.
The values are those of the whole model whatever the layout: sequence shards (SP) are gathered,
tensor-parallel heads and vocabulary shards combined, pipeline stages' layers all-gathered, and
ZeRO partitions read through DeepSpeed's full-parameter accessor.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist

from megatron_mixln.model.positions import TWO_STREAM

DIAGNOSTICS = ("activations", "attention", "logits", "updates")
# The explicit attention logits are computed a chunk of query rows at a time, at most this many logits per chunk.
_CHUNK_ELEMENTS = 1 << 24


def parse_diagnostics(text: str) -> tuple[str, ...]:
    """'activations,attention' -> ("activations", "attention"). Raises ValueError naming --diagnostics
    and the allowed names for anything else."""
    names = tuple(n.strip() for n in str(text).split(",") if n.strip())
    unknown = [n for n in names if n not in DIAGNOSTICS]
    if unknown or not names:
        raise ValueError(f"--diagnostics: unknown {', '.join(map(repr, unknown)) or 'empty list'}; "
                         f"allowed (comma-separated): {', '.join(DIAGNOSTICS)}")
    return names


@dataclass
class Layout:
    """What the probe needs to know of the parallel layout (all None/1: one process)."""

    tp_group: object = None
    pp_group: object = None
    tp_rank: int = 0
    seq_length: int | None = None  # the full sequence; a shorter activation is an SP shard
    param_getter: Callable | None = None  # full (ZeRO) parameter of a local tensor; default p.detach()

    @property
    def tp_size(self) -> int:
        return 1 if self.tp_group is None else dist.get_world_size(self.tp_group)


def _stream(x, two_stream: bool = False) -> torch.Tensor:
    """A block's input/output as one tensor: a handed-off pair (h, d) stands for h + d; the pair of a
    two-stream layer (SiameseNorm (x, y), ResiDual (x, d)) gives its second, un-normalised stream, the
    one that grows with depth (the first is renormalised at every sublayer)."""
    if isinstance(x, tuple):
        return x[1] if two_stream else x[0] + x[1]
    return x


def activation_stats(x_in: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    """Residual-stream statistics of one layer; x_in, y: (batch, seq, hidden), the stream entering and
    leaving the layer.

    rms_in/rms_out: sqrt(mean x^2) over all elements; max: max |y|; max_over_median: max |y| over the
    lower median of |y| (torch.median), the "massive activations" ratio of Sun et al. 2024
    (arXiv 2402.17762); kurtosis: the outlier-feature kurtosis of He et al. 2024 (arXiv 2405.19279,
    eq. 1) of y, mean_j(s_j^4) / mean_j(s_j^2)^2 with s_j^2 the mean over tokens of y[..., j]^2
    (1 when every feature has the same scale, the hidden size when one feature carries everything)."""
    x_in, y = x_in.detach().double(), y.detach().double()
    a = y.abs().flatten()
    s2 = y.pow(2).flatten(0, -2).mean(0)  # per feature: mean square over tokens
    return {"rms_in": float(x_in.pow(2).mean().sqrt()), "rms_out": float(y.pow(2).mean().sqrt()),
            "max": float(a.max()), "max_over_median": float(a.max() / a.median()),
            "kurtosis": float(s2.pow(2).mean() / s2.mean().pow(2))}


@torch.no_grad()
def attention_stats(q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per query head: the max pre-softmax logit q.k/sqrt(d) over the batch and every causal (query,
    key) pair, and the attention entropy -sum_j p_ij log p_ij averaged over batch and queries (nats).

    q: (batch, heads, seq, head_dim), k: (batch, kv_heads, seq, head_dim), both after RoPE; kv heads
    are shared by heads/kv_heads consecutive query heads (GQA, as SDPA's enable_gqa). The logits the
    fused kernel never materialises are computed here in fp32, a chunk of query rows at a time.
    Returns two float64 tensors of shape (heads,)."""
    batch, heads, seq, dim = q.shape
    if k.shape[1] != heads:
        k = k.repeat_interleave(heads // k.shape[1], dim=1)
    q, k = q.float() / math.sqrt(dim), k.float()
    rows = max(1, _CHUNK_ELEMENTS // max(1, batch * heads * seq))
    logit_max = torch.full((heads,), -math.inf, dtype=torch.float64, device=q.device)
    entropy = torch.zeros(heads, dtype=torch.float64, device=q.device)
    for start in range(0, seq, rows):
        stop = min(seq, start + rows)
        logits = q[:, :, start:stop] @ k[:, :, :stop].transpose(-1, -2)  # keys after `stop` are all masked
        future = torch.arange(stop, device=q.device)[None, :] > torch.arange(start, stop, device=q.device)[:, None]
        logits = logits.masked_fill(future, -math.inf)
        logit_max = torch.maximum(logit_max, logits.amax(dim=(0, 2, 3)).double())
        logp = torch.log_softmax(logits, dim=-1)
        ent = -(logp.exp() * logp.masked_fill(future, 0.0)).sum(-1)  # (batch, heads, rows)
        entropy += ent.double().sum(dim=(0, 2))
    return logit_max, entropy / (batch * seq)


class StabilityProbe:
    """Hooks on the transformer blocks (and LM head) of `model` -- a plain `Transformer`, a TP-sharded
    one or a pipeline stage -- for the duration of a `with` block; `results()` after it.

    `names`: a subset of DIAGNOSTICS. Memory: "updates" keeps a copy of this rank's block parameters
    (fp32 masters under ZeRO/bf16) from the start of the step to the end."""

    def __init__(self, model: torch.nn.Module, names, layout: Layout | None = None):
        from megatron_mixln.model.block import Block

        self.names = tuple(names)
        self.layout = layout or Layout()
        self.blocks = sorted((m for m in model.modules() if isinstance(m, Block)), key=lambda b: b.layer_number)
        self.head = next((m for name, m in model.named_modules() if name.endswith("lm_head")), None)
        self._handles, self._before = [], {}
        self.rows: dict[int, dict] = {b.layer_number: {} for b in self.blocks}
        self._q: dict[int, torch.Tensor] = {}
        self.z: tuple[float, float, int] | None = None  # (sum, max, tokens) of logsumexp

    # --- hooks ---------------------------------------------------------------------------------
    def __enter__(self):
        if "activations" in self.names:
            for b in self.blocks:
                self._handles.append(b.register_forward_hook(self._block_hook, with_kwargs=False))
        if "attention" in self.names:
            for b in self.blocks:
                self._handles.append(b.attn.q_proj.register_forward_hook(self._q_hook(b)))
                self._handles.append(b.attn.k_proj.register_forward_hook(self._k_hook(b)))
        if "logits" in self.names and self.head is not None:
            self._handles.append(self.head.register_forward_hook(self._head_hook))
        if "updates" in self.names:
            get = self._param_getter()
            self._before = {id(p): get(p).detach().clone() for b in self.blocks for p in b.parameters()}
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles = []
        return False

    def _full_sequence(self, x: torch.Tensor) -> torch.Tensor:
        """An SP shard (dim 1 shorter than the sequence) gathered over the TP group."""
        lay = self.layout
        if lay.tp_size > 1 and lay.seq_length and x.shape[1] != lay.seq_length:
            from megatron_mixln.parallel.mappings import all_gather_along

            return all_gather_along(x.contiguous(), 1, lay.tp_group)
        return x

    @torch.no_grad()
    def _block_hook(self, block, args, out):
        row = self.rows[block.layer_number]
        if "rms_in" in row:  # first micro-batch only (and not activation recomputation)
            return
        two_stream = block.position in TWO_STREAM
        x_in = self._full_sequence(_stream(args[0], two_stream).detach())
        y = self._full_sequence(_stream(out, two_stream).detach())
        row.update(activation_stats(x_in, y))

    def _q_hook(self, block):
        def hook(module, args, out):
            if block.layer_number not in self._q and "attn_logit_max" not in self.rows[block.layer_number]:
                self._q[block.layer_number] = out.detach()
        return hook

    def _k_hook(self, block):
        @torch.no_grad()
        def hook(module, args, out):
            q = self._q.pop(block.layer_number, None)
            if q is None:
                return
            from megatron_mixln.model.attention import apply_rope, rope_cos_sin

            attn = block.attn
            batch, seq = q.shape[0], q.shape[1]
            q = q.view(batch, seq, -1, attn.head_dim).transpose(1, 2)
            k = out.detach().view(batch, seq, -1, attn.head_dim).transpose(1, 2)
            cos, sin = rope_cos_sin(seq, attn.head_dim, attn.rotary_base, q.device)
            logit_max, entropy = attention_stats(apply_rope(q, cos, sin), apply_rope(k, cos, sin))
            self.rows[block.layer_number].update(attn_logit_max=logit_max.cpu(), attn_entropy=entropy.cpu())
        return hook

    @torch.no_grad()
    def _head_hook(self, module, args, out):
        if self.z is not None:
            return
        lse = torch.logsumexp(out.detach().float(), dim=-1)  # (batch, seq); a vocab shard under TP
        lay = self.layout
        if lay.tp_size > 1:  # logsumexp over the shards' logsumexps = that of the whole vocabulary
            from megatron_mixln.parallel.mappings import all_gather_along

            lse = torch.logsumexp(all_gather_along(lse[None].contiguous(), 0, lay.tp_group), dim=0)
        lse = lse.double()
        self.z = (float(lse.sum()), float(lse.max()), lse.numel())

    def _param_getter(self):
        return self.layout.param_getter or (lambda p: p.detach())

    # --- results (collective) ------------------------------------------------------------------
    def results(self) -> dict[str, float]:
        """The flat metrics of the step, the same on every rank of a model-parallel group. Collective
        over the TP and PP groups (every rank of them must call it)."""
        lay = self.layout
        if "updates" in self.names:
            self._measure_updates()
        if "attention" in self.names and lay.tp_size > 1:  # heads are split over TP in rank order
            keys = ("attn_logit_max", "attn_entropy")
            parts = [None] * lay.tp_size
            dist.all_gather_object(parts, {n: [r[k] for k in keys] for n, r in self.rows.items()}, group=lay.tp_group)
            for n, row in self.rows.items():
                for i, key in enumerate(keys):
                    row[key] = torch.cat([part[n][i] for part in parts])
        rows, z = {n: dict(r) for n, r in self.rows.items()}, self.z
        if lay.pp_group is not None and dist.get_world_size(lay.pp_group) > 1:
            stages = [None] * dist.get_world_size(lay.pp_group)
            dist.all_gather_object(stages, (rows, z), group=lay.pp_group)
            rows, z = {}, None
            for stage_rows, stage_z in stages:
                rows.update(stage_rows)
                z = stage_z if stage_z is not None else z
        return flatten_stability(rows, z)

    @torch.no_grad()
    def _measure_updates(self) -> None:
        """||w|| and ||w - w_before|| per block: TP shards' squares summed over the group, replicated
        parameters counted on TP rank 0 only."""
        get, lay = self._param_getter(), self.layout
        if not self.blocks:
            return
        sums = torch.zeros(len(self.blocks), 2, dtype=torch.float64)
        for i, block in enumerate(self.blocks):
            for p in block.parameters():
                w = get(p).detach()
                if getattr(p, "tensor_model_parallel", False) or lay.tp_rank == 0:
                    sums[i, 0] += w.double().pow(2).sum().cpu()
                    sums[i, 1] += (w.double() - self._before[id(p)].double()).pow(2).sum().cpu()
        if lay.tp_size > 1:
            device = self.blocks[0].attn.o_proj.weight.device
            sums = sums.to(device)
            dist.all_reduce(sums, group=lay.tp_group)
            sums = sums.cpu()
        self._before = {}
        for block, (w2, d2) in zip(self.blocks, sums.tolist()):
            self.rows[block.layer_number].update(weight_norm=math.sqrt(w2), update_ratio=math.sqrt(d2 / w2) if w2 else 0.0)


def flatten_stability(rows: dict[int, dict], z: tuple | None) -> dict[str, float]:
    """{layer: {stat: value}} + z -> metric keys: "act_rms_in/layer_01", "attn_logit_max/layer_01"
    (max over heads), "attn_logit_max/layer_01/head_00", "attn_entropy/layer_01" (mean over heads),
    "update_ratio/layer_01", "weight_norm/layer_01", "z_mean", "z_max"."""
    out = {}
    for layer in sorted(rows):
        tag = f"layer_{layer:02d}"
        for key, value in rows[layer].items():
            if key in ("attn_logit_max", "attn_entropy"):
                heads = value.tolist()
                out[f"{key}/{tag}"] = max(heads) if key == "attn_logit_max" else sum(heads) / len(heads)
                out.update({f"{key}/{tag}/head_{h:02d}": v for h, v in enumerate(heads)})
            else:
                out[f"{'act_' if key in _ACTIVATION_KEYS else ''}{key}/{tag}"] = value
    if z is not None:
        out["z_mean"], out["z_max"] = z[0] / z[2], z[1]
    return out


_ACTIVATION_KEYS = ("rms_in", "rms_out", "max", "max_over_median", "kurtosis")
