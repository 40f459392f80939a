"""Whole per-GPU memory of a layout: model states + activations + ZeRO buffers + reserve; fits or not,
and the smallest single change that makes it fit."""
from __future__ import annotations

from dataclasses import dataclass, field

from megatron_mixln.model import ModelConfig
from megatron_mixln.model.block import scales_per_layer
from megatron_mixln.model.two_stream import final_norm_count
from megatron_mixln.planning.activations import activation_bytes
from megatron_mixln.planning.layout import Layout, check_layout
from megatron_mixln.planning.model_states import ModelStates, model_states, param_counts

GIB = 1024**3


def zero_buffers(zero: dict, layout: Layout, model: ModelConfig) -> dict[str, int]:
    """Bytes per GPU of DeepSpeed's communication buffers, from a filled zero_optimization section
    (sizes in elements; DeepSpeed's defaults where a key is absent).

    stage 0: the gradient all-reduce flattens at most allreduce_bucket_size elements at a time;
    stages 1-2: with contiguous_gradients, reduce_bucket_size elements of gradient staging, twice with
    overlap_comm (stage_1_and_2.setup_buckets); stage 3: one reduce bucket, the prefetch bucket of
    gathered parameters in flight (capped by stage3_max_live_parameters), and the parameters under
    stage3_param_persistence_threshold elements, which are kept whole on every rank (norm gains).
    """
    e = 2 if layout.bf16 else 4
    counts = param_counts(model, layout.tensor_model_parallel_size, layout.pipeline_model_parallel_size)
    stage = layout.zero_stage
    if stage == 0:
        return {"all-reduce bucket": e * min(int(zero.get("allreduce_bucket_size", 5e8)), counts["rank"])}
    reduce = int(zero.get("reduce_bucket_size", 5e8))
    if stage in (1, 2):
        copies = (2 if zero.get("overlap_comm", False) else 1) if zero.get("contiguous_gradients", True) else 0
        return {"gradient reduce buckets": copies * e * reduce}
    prefetch = min(int(zero.get("stage3_prefetch_bucket_size", 5e7)), int(zero.get("stage3_max_live_parameters", 1e9)))
    threshold = int(zero.get("stage3_param_persistence_threshold", 1e5))
    h = model.hidden_size
    small = 0
    if h <= threshold:  # norm parameters (gains, biases, q/k/v norms, DyT scalars, hybrid_pre's c1) are this small
        from megatron_mixln.planning.model_states import layer_norm_param_count, norm_param_count

        norms = sum(layer_norm_param_count(model, p) for p in model.positions)
        norms += final_norm_count(model) * norm_param_count(model, h)
        norms += sum(scales_per_layer(p, model.siamese_variant) for p in model.positions) * h
        norms += 1 if model.learnable_embedding_scale else 0
        small = norms // layout.pipeline_model_parallel_size
    return {"reduce bucket": e * reduce, "prefetch bucket": e * prefetch, "persistent small params": e * small}


@dataclass
class MemoryPlan:
    model: ModelConfig
    layout: Layout
    states: ModelStates
    activations: dict  # bytes, from activation_bytes (times micro-batches in flight under PP)
    in_flight: int
    buffers: dict
    reserve: int
    gpu_capacity: int
    cpu_per_node: int
    cpu_capacity: int | None
    deepspeed_estimate: dict | None = None
    suggestions: list[str] = field(default_factory=list)

    @property
    def gpu_total(self) -> int:
        return self.states.gpu + self.activations["total"] + sum(self.buffers.values()) + self.reserve

    @property
    def fits(self) -> bool:
        cpu_ok = self.cpu_capacity is None or self.cpu_per_node <= self.cpu_capacity
        return self.gpu_total <= self.gpu_capacity and cpu_ok


def _activations(model: ModelConfig, layout: Layout, global_batch_size: int | None) -> tuple[dict, int]:
    """Activations of the fullest pipeline stage: 1F1B keeps min(pp - stage, accumulation steps) micro-batches."""
    pp = layout.pipeline_model_parallel_size
    kw = dict(micro_batch=layout.micro_batch_size, seq=layout.seq_length, bf16=layout.bf16, impl=layout.norm_impl,
              recompute=layout.recompute_activations, tp=layout.tensor_model_parallel_size,
              sequence_parallel=layout.sequence_parallel)
    if pp == 1:
        return activation_bytes(model, **kw), 1
    accumulation = pp if global_batch_size is None else max(
        1, global_batch_size // (layout.micro_batch_size * layout.data_parallel_size))
    per_stage = model.num_layers // pp
    best, best_flight = None, 1
    for s in range(pp):
        a = activation_bytes(model, layers=range(s * per_stage, (s + 1) * per_stage), with_head=s == pp - 1, **kw)
        flight = min(pp - s, accumulation)
        total = flight * (a["embedding"] + a["blocks"]) + a["recompute_peak"] + a["head"]
        if best is None or total > best["total"]:
            best = {**a, "embedding": flight * a["embedding"], "blocks": flight * a["blocks"], "total": total}
            best_flight = flight
    return best, best_flight


def deepspeed_estimate(model: ModelConfig, layout: Layout) -> dict | None:
    """DeepSpeed's own model-state estimators (bf16/fp16 Adam), where they apply: ZeRO 1-3, no TP/PP.
    -> {'gpu': bytes per GPU, 'cpu': bytes per node, with DeepSpeed's 1.5 buffer factor}."""
    if layout.zero_stage == 0 or layout.tensor_model_parallel_size > 1 or layout.pipeline_model_parallel_size > 1:
        return None
    try:
        from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
        from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs
    except ImportError:
        return None
    counts = param_counts(model)
    if layout.zero_stage == 3:
        cpu, gpu, _ = estimate_zero3_model_states_mem_needs(
            counts["total"], counts["largest_layer"], layout.gpus_per_node, layout.nodes,
            cpu_offload=layout.offload_optimizer, cpu_offload_params=layout.offload_param, zero_init=True)
    else:
        cpu, gpu = estimate_zero2_model_states_mem_needs(counts["total"], layout.gpus_per_node, layout.nodes,
                                                         cpu_offload=layout.offload_optimizer)
    return {"gpu": gpu, "cpu": cpu}


def plan_memory(model: ModelConfig, layout: Layout, zero: dict | None = None, gpu_memory_gib: float = 80.0,
                cpu_memory_gib: float | None = None, reserve_gib: float = 2.0, global_batch_size: int | None = None,
                suggest: bool = True) -> MemoryPlan:
    """Plan one layout. `zero` is a filled zero_optimization section (None: DeepSpeed's defaults for the
    layout's stage). Raises LayoutError for an impossible layout."""
    check_layout(layout, model, global_batch_size)
    zero = dict(zero or {})
    states = model_states(model, layout)
    acts, flight = _activations(model, layout, global_batch_size)
    plan = MemoryPlan(
        model=model, layout=layout, states=states, activations=acts, in_flight=flight,
        buffers=zero_buffers(zero, layout, model), reserve=int(reserve_gib * GIB), gpu_capacity=int(gpu_memory_gib * GIB),
        cpu_per_node=states.cpu_per_rank * layout.gpus_per_node,
        cpu_capacity=None if cpu_memory_gib is None else int(cpu_memory_gib * GIB),
        deepspeed_estimate=deepspeed_estimate(model, layout),
    )
    if suggest and not plan.fits:
        plan.suggestions = _suggestions(model, layout, zero, gpu_memory_gib, cpu_memory_gib, reserve_gib,
                                        global_batch_size)
    return plan


def _fits(model, layout, zero, gpu, cpu, reserve, gbs) -> bool:
    try:
        return plan_memory(model, layout, zero, gpu, cpu, reserve, gbs, suggest=False).fits
    except ValueError:
        return False


def _suggestions(model, layout: Layout, zero, gpu, cpu, reserve, gbs) -> list[str]:
    """Single changes that make the layout fit, cheapest first: a higher ZeRO stage, a smaller micro-batch
    (same global batch, more accumulation), activation recomputation, more nodes, optimizer offload,
    parameter offload. If none does alone, the combination of all memory savers with the fewest nodes."""
    out = []
    candidates = []
    if layout.pipeline_model_parallel_size == 1:
        candidates += [(f"--zero-stage {s}", layout.replace(zero_stage=s)) for s in range(layout.zero_stage + 1, 4)]
    mb = layout.micro_batch_size // 2
    while mb >= 1:
        candidates.append((f"--micro-batch-size {mb}", layout.replace(micro_batch_size=mb)))
        mb //= 2
    if not layout.recompute_activations:
        candidates.append(("--recompute-activations", layout.replace(recompute_activations=True)))
    for n in range(layout.nodes + 1, 64 * layout.nodes + 1):
        candidates.append((f"--nodes {n}", layout.replace(nodes=n)))
    if layout.zero_stage > 0 and not layout.offload_optimizer:
        candidates.append(("--offload-optimizer", layout.replace(offload_optimizer=True)))
    if layout.zero_stage == 3 and not layout.offload_param:
        candidates.append(("--offload-optimizer --offload-param",
                           layout.replace(offload_param=True, offload_optimizer=True)))
    seen_kind = set()
    for text, cand in candidates:
        kind = text.split()[0]
        if kind in seen_kind:
            continue
        if _fits(model, cand, zero, gpu, cpu, reserve, gbs):
            out.append(text)
            seen_kind.add(kind)
    if out:
        return out
    saver = layout.replace(micro_batch_size=1, recompute_activations=True,
                           zero_stage=3 if layout.pipeline_model_parallel_size == 1 else layout.zero_stage)
    for n in range(layout.nodes, 64 * layout.nodes + 1):
        if _fits(model, saver.replace(nodes=n), zero, gpu, cpu, reserve, gbs):
            return [f"--micro-batch-size 1 --recompute-activations --zero-stage {saver.zero_stage} --nodes {n}"]
    return []


def _gib(n: float) -> str:
    return f"{n / GIB:8.2f} GiB"


def format_plan(plan: MemoryPlan) -> str:
    m, lay, st = plan.model, plan.layout, plan.states
    counts = param_counts(m, lay.tensor_model_parallel_size, lay.pipeline_model_parallel_size)
    lines = [
        f"model: {m.num_layers} layers, hidden {m.hidden_size}, ffn {m.ffn_hidden_size}, heads {m.num_attention_heads}"
        f" (kv {m.num_query_groups}), vocab {m.vocab_size}; {counts['total']:,} parameters"
        f" ({counts['rank']:,} on the fullest rank, largest layer {counts['largest_layer']:,})",
        f"norm positions: {m.positions_str}",
        f"layout: {lay.nodes} nodes x {lay.gpus_per_node} GPUs = {lay.world_size}; TP {lay.tensor_model_parallel_size}"
        f"{' + SP' if lay.sequence_parallel else ''}, PP {lay.pipeline_model_parallel_size}, DP {lay.data_parallel_size};"
        f" ZeRO {lay.zero_stage}{' + optimizer offload' if lay.offload_optimizer else ''}"
        f"{' + param offload' if lay.offload_param else ''}; {'bf16' if lay.bf16 else 'fp32'}; micro-batch"
        f" {lay.micro_batch_size} x {lay.seq_length} tokens; recompute {'on' if lay.recompute_activations else 'off'};"
        f" norms {lay.norm_impl}",
        "",
        "per GPU:",
        f"  weights (16-bit)                    {_gib(st.weights)}" if lay.bf16 else f"  weights (fp32)                      {_gib(st.weights)}",
        f"  gradients                           {_gib(st.grads)}",
        f"  optimizer (fp32 master + Adam m, v) {_gib(st.optimizer)}",
        f"  fp32 gradients                      {_gib(st.fp32_grads)}",
    ]
    if st.gathered:
        lines.append(f"  ZeRO-3 gathered largest layer       {_gib(st.gathered)}")
    lines.append(f"  = model states                      {_gib(st.gpu)}")
    if plan.deepspeed_estimate:
        lines.append(f"    (DeepSpeed's estimator:           {_gib(plan.deepspeed_estimate['gpu'])})")
    a = plan.activations
    flight = f" x {plan.in_flight} micro-batches in flight (1F1B)" if plan.in_flight > 1 else ""
    if a["embedding"]:
        lines.append(f"  activations, embedding scale        {_gib(a['embedding'])}")
    lines += [
        f"  activations, blocks{flight:<17}{_gib(a['blocks'])}",
        f"  activations, block recomputed       {_gib(a['recompute_peak'])}",
        f"  activations, LM head + loss         {_gib(a['head'])}",
    ]
    lines += [f"  {name:<36}{_gib(v)}" for name, v in plan.buffers.items()]
    lines += [
        f"  reserve (CUDA context, allocator)   {_gib(plan.reserve)}",
        f"  = total                             {_gib(plan.gpu_total)}   of {_gib(plan.gpu_capacity).strip()}",
    ]
    if plan.cpu_per_node or plan.cpu_capacity is not None:
        cap = f"   of {_gib(plan.cpu_capacity).strip()}" if plan.cpu_capacity is not None else ""
        lines.append(f"CPU per node (offloaded states, pinned) {_gib(plan.cpu_per_node)}{cap}")
        if plan.deepspeed_estimate and plan.cpu_per_node:
            lines.append(f"    (DeepSpeed's estimator, x1.5 buffer: {_gib(plan.deepspeed_estimate['cpu']).strip()})")
    lines.append("")
    if plan.fits:
        lines.append(f"FITS: {_gib(plan.gpu_capacity - plan.gpu_total).strip()} free per GPU")
    else:
        lines.append(f"DOES NOT FIT: {_gib(plan.gpu_total - plan.gpu_capacity).strip()} over per GPU"
                     if plan.gpu_total > plan.gpu_capacity else "DOES NOT FIT: CPU memory per node")
        if plan.suggestions:
            lines.append("smallest changes that fit (first = recommended): " + "; ".join(plan.suggestions))
        else:
            lines.append("no change tried fits (up to 64x the nodes with every memory saver on)")
    return "\n".join(lines)
