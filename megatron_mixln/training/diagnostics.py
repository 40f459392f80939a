"""The trainer's side of --diagnostics-interval: which steps are probed, and the layout the probe reads."""
from __future__ import annotations

from megatron_mixln.diagnostics.stability import Layout, StabilityProbe, parse_diagnostics


def _param_getter(engine):
    """Where the full weights live: p itself (ZeRO-0 fp32 or pure bf16), else DeepSpeed's fp32 master
    copy (ZeRO-1/2/3 partitions, bf16 mode), falling back to p where DeepSpeed keeps none for it
    (bf16 at ZeRO-0 without its bf16 optimizer). Collective under ZeRO-3: every rank asks in the same order."""
    if engine.zero_optimization_stage() == 0 and not engine.bfloat16_enabled():
        return lambda p: p.detach()
    from deepspeed.utils import safe_get_full_fp32_param

    def full(p):
        master = safe_get_full_fp32_param(p)
        return p.detach() if master is None else master

    return full


def start_probe(engine, cfg, state, seq_length: int, step: int) -> StabilityProbe | None:
    """A probe entered on the model when `step` logs diagnostics (every --diagnostics-interval steps),
    else None. Call `finish_probe` right after the step."""
    if not cfg.diagnostics_interval or step % cfg.diagnostics_interval:
        return None
    layout = Layout(seq_length=seq_length, param_getter=_param_getter(engine))
    if state is not None:
        layout.tp_group = state.tp_group if state.tp_size > 1 else None
        layout.pp_group = state.pp_group if state.pp_size > 1 else None
        layout.tp_rank = state.tp_rank
    return StabilityProbe(engine.module, parse_diagnostics(cfg.diagnostics), layout).__enter__()


def finish_probe(probe: StabilityProbe) -> dict[str, float]:
    """Remove the hooks and return the step's diagnostics (collective over the model-parallel group)."""
    probe.__exit__(None, None, None)
    return probe.results()
