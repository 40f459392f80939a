"""Two-stream positions (siamese, residual-dual) under DeepSpeed's pipeline engine on 4 processes:
PP=2 x DP=2 and TP=2 x PP=2 with sequence parallelism and activation checkpointing, against
single-process training from the same weights (see parallel_jobs)."""
from __future__ import annotations

import torch

from megatron_mixln.model import build_model
from megatron_mixln.parallel import initialize_model_parallel
from parallel_jobs import _deepspeed, adamw, pipeline_engine, pipeline_train, reference_losses, sgd, tiny_config, warmup

CASES = {"siamese": dict(norm_position="siamese", num_layers=4),
         "siamese-hybrid_pre": dict(norm_position="siamese", siamese_variant="hybrid_pre", num_layers=2),
         "residual-dual": dict(norm_position="residual-dual", num_layers=4, normalization="LayerNorm")}


def _boundary_payload(engine):
    """What this stage's last block hands to the next stage, recorded by a forward hook: the number of
    tensors and their shapes (the stage's last block is the one before the head on the last stage)."""
    from megatron_mixln.model.block import Block
    from megatron_mixln.parallel.pipeline import local_layers

    blocks = [m for _, m in sorted(local_layers(engine.module).items()) if isinstance(m, Block)]
    seen = []
    blocks[-1].register_forward_hook(lambda m, a, out: seen.append(
        [tuple(t.shape) for t in out] if isinstance(out, tuple) else [tuple(out.shape)]))
    return seen


def two_stream_pipeline_job(rank, world_size, tmpdir):
    deepspeed = _deepspeed()
    out = {}
    for name, overrides in CASES.items():
        cfg = tiny_config(**overrides)
        torch.manual_seed(0)
        sd0 = {k: v.clone() for k, v in build_model(cfg).state_dict().items()}

        state = initialize_model_parallel(1, 2)  # PP=2 x DP=2, AdamW
        engine = pipeline_engine(deepspeed, cfg, state, adamw, partition_method="uniform", state_dict=sd0)
        seen = _boundary_payload(engine)
        out[f"{name}/pp2_dp2"] = pipeline_train(engine, cfg, state, range(3))
        out[f"{name}/pp2_dp2_ref"] = reference_losses(cfg, sd0, adamw, range(3))
        out[f"{name}/payload"] = seen[0]
        out[f"{name}/stage"] = state.pp_rank
        del engine

        state = initialize_model_parallel(2, 2)  # TP=2 x PP=2, SP, ZeRO-1, recompute, SGD + warm-up
        engine = pipeline_engine(deepspeed, cfg, state, sgd, warmup, zero_stage=1, sequence_parallel=True,
                                 state_dict=sd0, activation_checkpoint_interval=1)
        out[f"{name}/tp2_pp2_sp"] = pipeline_train(engine, cfg, state, range(3))
        out[f"{name}/tp2_pp2_sp_ref"] = reference_losses(cfg, sd0, sgd, range(3), warmup)
        del engine
    return out
