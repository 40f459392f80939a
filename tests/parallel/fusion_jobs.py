"""Jobs for test_parallel_fusion.py: cross-block fusion under TP/SP/PP and activation recomputation,
each compared with today's unfused path (cross_block_fusion=False) run in a single process."""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from megatron_mixln.model import build_model
from megatron_mixln.model.block import Block
from megatron_mixln.parallel import (
    apply_tensor_parallel, gather_from_tp_last_dim, gather_plain_tensors, initialize_model_parallel,
    vocab_parallel_cross_entropy,
)
from megatron_mixln.training.model_setup import apply_activation_checkpointing
from parallel_jobs import _deepspeed, _max_err, adamw, batch, pipeline_engine, pipeline_train, reference_losses, tiny_config

# boundaries: pre->pre, peri->lns, lns->post, post->pre, pre->final norm
MIXES = {"pre": dict(norm_position="pre", num_layers=3),
         "mixed": dict(norm_position="peri,lns,post,pre", num_layers=4, num_query_groups=2)}
# PP=2, uniform: stage 0 = embedding + layers 1-2, stage 1 = layers 3-4 + head; pre -> peri crosses the stages
PIPELINE = dict(norm_position="post,pre,peri,lns", num_layers=4)


def tp_sp_recompute_job(rank, world_size, tmpdir):
    """TP=2 with SP, fused, with and without activation checkpointing vs TP=1 unfused: logits and every
    gradient; then PP=2 (DeepSpeed pipeline, fused, activation checkpointing) vs unfused training."""
    out = {}
    state = initialize_model_parallel(2, 1)
    for case, overrides in MIXES.items():
        cfg = tiny_config(**overrides)
        torch.manual_seed(0)
        ref = build_model(cfg.replace(cross_block_fusion=False))
        tokens, labels = batch(cfg)
        ref_logits = ref(tokens)
        F.cross_entropy(ref_logits.flatten(0, 1), labels.flatten()).backward()
        ref_grads = {k: p.grad for k, p in ref.named_parameters()}
        for variant, sp, recompute in (("tp", False, False), ("sp", True, False), ("sp_recompute", True, True)):
            model = build_model(cfg)
            model.load_state_dict(ref.state_dict())
            out[f"{case}/{variant}/plan"] = [b.hand_off_residual for b in model.layers]
            apply_tensor_parallel(model, state, sequence_parallel=sp)
            if recompute:
                apply_activation_checkpointing(model)
            logits = model(tokens)
            vocab_parallel_cross_entropy(logits, labels).mean().backward()
            out[f"{case}/{variant}/logits"] = float((gather_from_tp_last_dim(logits, state.tp_group) - ref_logits).abs().max())
            out[f"{case}/{variant}/grads"] = _max_err(gather_plain_tensors(model, state, grads=True), ref_grads)

    deepspeed = _deepspeed()
    cfg = tiny_config(**PIPELINE)
    torch.manual_seed(0)
    sd0 = {k: v.clone() for k, v in build_model(cfg).state_dict().items()}
    state = initialize_model_parallel(1, 2)
    engine = pipeline_engine(deepspeed, cfg, state, adamw, partition_method="uniform", state_dict=sd0,
                             activation_checkpoint_interval=1)
    blocks = [m for m in engine.module.modules() if isinstance(m, Block)]
    out["pp2/plan"] = [(b.layer_number, b.hand_off_residual) for b in blocks]
    out["pp2"] = pipeline_train(engine, cfg, state, range(3))
    out["pp2_ref"] = reference_losses(cfg.replace(cross_block_fusion=False), sd0, adamw, range(3))
    return out
