"""Norm-zoo models (QK-norm, reordered, HybridNorm*, DyT/Derf, z-loss) under TP=2, TP=2+SP and PP=2 against
one process (2 processes; see test_parallel_zoo.py)."""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from megatron_mixln.model import build_model
from megatron_mixln.parallel import (apply_tensor_parallel, gather_from_tp_last_dim, gather_plain_tensors,
                                     initialize_model_parallel, vocab_parallel_cross_entropy)
from megatron_mixln.parallel.cross_entropy import vocab_parallel_logsumexp
from parallel_jobs import batch, tiny_config

# Two "walk" models between them use every position and option (full QK-norm excludes DyT/Derf and hybrid).
ZOO_CASES = {
    "walk_derf_every_position": dict(
        norm_position="pre,post,peri,lns,deepnorm,deeppost,reordered,hybrid-first,hybrid", num_layers=9,
        normalization="Derf", qk_norm="head", qk_norm_per_head_gain=True, num_query_groups=2,
        learnable_embedding_scale=True),
    "walk_full_qk_olmo2": dict(norm_position="lns,reordered,peri,post,reordered", num_layers=5, qk_norm="full",
                               num_query_groups=2),
    "hybridnorm_star_dyt": dict(norm_position="hybridnorm-star", num_layers=3, normalization="DyT", dyt_bias=True,
                                learnable_embedding_scale=True),
    # linear biases: q/k/v, gate/up and the head split with their rows, o/down replicated (summed over TP under SP)
    "walk_linear_biases_gqa": dict(norm_position="pre,post,reordered", num_layers=3, normalization="LayerNorm",
                                   add_bias_linear=True, add_output_layer_bias=True, num_query_groups=2),
}
Z_LOSS = {"walk_full_qk_olmo2": 1e-2}  # a large W so its gradient is visible at this size


def _loss(logits, labels, z_weight, tp_group):
    if tp_group is None:
        ce = F.cross_entropy(logits.flatten(0, 1), labels.flatten())
        z = torch.logsumexp(logits.float(), dim=-1).pow(2).mean()
    else:
        ce = vocab_parallel_cross_entropy(logits, labels).mean()
        z = vocab_parallel_logsumexp(logits, tp_group).pow(2).mean()
    return ce + z_weight * z


def tp_zoo_job(rank, world_size, tmpdir):
    """Per case and variant (tp, sp, and the negative control rank-local full QK-norm): errors of logits,
    loss and of every parameter's gradient (by name) against TP=1."""
    state = initialize_model_parallel(2, 1)
    out = {}
    for case, overrides in ZOO_CASES.items():
        cfg = tiny_config(**overrides)
        z_weight = Z_LOSS.get(case, 0.0)
        torch.manual_seed(0)
        ref = build_model(cfg)
        with torch.no_grad():  # gains at 1, alphas at their init, biases at 0 would hide a wrong slice or a missing sum
            gen = torch.Generator().manual_seed(3)
            for name, p in ref.named_parameters():
                if "norm" in name or name.endswith(".bias") or name == "embed_scale.weight":
                    p.copy_(1 + 0.3 * torch.randn(p.shape, generator=gen))
        tokens, labels = batch(cfg)
        ref_logits = ref(tokens)
        ref_loss = _loss(ref_logits, labels, z_weight, None)
        ref_loss.backward()
        ref_grads = {k: p.grad for k, p in ref.named_parameters()}
        variants = [("tp", False), ("sp", True)] + ([("rank_local_qk", False)] if cfg.qk_norm == "full" else [])
        for variant, sp in variants:
            model = copy.deepcopy(ref)
            model.zero_grad(set_to_none=True)
            apply_tensor_parallel(model, state, sequence_parallel=sp)
            if variant == "rank_local_qk":  # what GPT-NeoX's across_heads did under TP: statistics of local heads
                for layer in model.layers:
                    for n in (layer.attn.q_norm, layer.attn.k_norm):
                        n.sum_over_tp = lambda t: t * 2  # local sum x TP: right only if every rank's heads agreed
            logits = model(tokens)
            loss = _loss(logits, labels, z_weight, state.tp_group)
            loss.backward()
            grads = gather_plain_tensors(model, state, grads=True)
            prefix = f"{case}/{variant}"
            out[f"{prefix}/logits"] = float((gather_from_tp_last_dim(logits, state.tp_group) - ref_logits).abs().max())
            out[f"{prefix}/loss"] = abs(float(loss) - float(ref_loss))
            out[f"{prefix}/grads"] = {k: float((grads[k] - g).abs().max()) for k, g in ref_grads.items()}
        if case == "hybridnorm_star_dyt":  # negative control: SP without the TP sum of the marked gradients
            model = copy.deepcopy(ref)
            model.zero_grad(set_to_none=True)
            apply_tensor_parallel(model, state, sequence_parallel=True, sp_grad_hooks=False)
            _loss(model(tokens), labels, z_weight, state.tp_group).backward()
            ref_scale = ref_grads["embed_scale.weight"]
            out[f"{case}/sp_unsummed_embed_scale"] = float((model.embed_scale.weight.grad - ref_scale).abs().max()
                                                           / ref_scale.abs().max())
    return out


def pp_zoo_job(rank, world_size, tmpdir):
    """PP=2 (DeepSpeed's pipeline engine, DP=1) and TP=2+SP (plain engine) training losses over 3 SGD steps
    against single-process training, for a zoo model whose depth-indexed parts (LNS) sit on both stages."""
    from parallel_jobs import _deepspeed, pipeline_engine, pipeline_train, plain_engine, plain_train, reference_losses, sgd

    deepspeed = _deepspeed()
    cfg = tiny_config(norm_position="hybrid-first,lns,reordered,lns", num_layers=4, qk_norm="head",
                      normalization="DyT", num_query_groups=2, learnable_embedding_scale=True, add_bias_linear=True,
                      add_output_layer_bias=True)
    torch.manual_seed(0)
    sd0 = {k: v.clone() for k, v in build_model(cfg).state_dict().items()}
    out = {"ref": reference_losses(cfg, sd0, sgd, range(3))}
    state = initialize_model_parallel(1, 2)
    engine = pipeline_engine(deepspeed, cfg, state, sgd, partition_method="uniform", state_dict=sd0)
    out["pp2"] = pipeline_train(engine, cfg, state, range(3))
    out["pp2_layer_numbers"] = [b.layer_number for b in engine.module.modules() if hasattr(b, "layer_number")]
    del engine
    out.update(_pipeline_z_loss(deepspeed, cfg, sd0))
    cfg_full = tiny_config(norm_position="reordered,peri,reordered", num_layers=3, qk_norm="full", num_query_groups=2,
                           learnable_embedding_scale=True, add_qkv_bias=True)  # the scale sees sequence shards under SP
    torch.manual_seed(0)
    sd1 = {k: v.clone() for k, v in build_model(cfg_full).state_dict().items()}
    out["ref_full"] = reference_losses(cfg_full, sd1, sgd, range(3))
    state = initialize_model_parallel(2, 1)
    engine = plain_engine(deepspeed, cfg_full, state, sgd, sequence_parallel=True, state_dict=sd1)
    out["tp2_sp_full"] = plain_train(engine, cfg_full, state, range(3))
    return out


def _pipeline_z_loss(deepspeed, cfg, sd0, weight=1e-2):
    """PP=2 with --z-loss-weight's loss function (training.loss.PipelineZLoss): total losses and the z-loss
    terms it keeps for logging, against one process computing CE + W*logsumexp^2 by hand."""
    from megatron_mixln.parallel import build_pipeline_module, check_deepspeed_config, load_plain_state_dict
    from megatron_mixln.training.loss import PipelineZLoss
    from parallel_jobs import GLOBAL_BATCH, MICRO_BATCHES, ds_config, rows_of, sgd, step_batch

    model = build_model(cfg)
    model.load_state_dict(sd0)
    opt = sgd(model.parameters())
    ref_total, ref_z = [], []
    for step in range(3):
        tokens, labels = step_batch(cfg, step)
        total = zsum = 0.0
        for t, l in rows_of(tokens, labels, 0, 1, GLOBAL_BATCH):
            logits = model(t)
            z = weight * torch.logsumexp(logits.float(), dim=-1).pow(2).mean()
            loss = (F.cross_entropy(logits.flatten(0, 1), l.flatten()) + z) / GLOBAL_BATCH
            loss.backward()
            total, zsum = total + float(loss), zsum + float(z) / GLOBAL_BATCH
        opt.step()
        opt.zero_grad(set_to_none=True)
        ref_total.append(total)
        ref_z.append(zsum)
    state = initialize_model_parallel(1, 2)
    pipe = build_pipeline_module(cfg, state, loss_fn=PipelineZLoss(weight, state), partition_method="uniform")
    load_plain_state_dict(pipe, sd0, state)
    config = check_deepspeed_config(ds_config(GLOBAL_BATCH // MICRO_BATCHES, MICRO_BATCHES, 1, 0), state, False)
    engine, *_ = deepspeed.initialize(model=pipe, optimizer=sgd(pipe.parameters()), config=config)
    totals, zs = [], []
    for step in range(3):
        tokens, labels = step_batch(cfg, step)
        totals.append(float(engine.train_batch(iter(rows_of(tokens, labels, 0, 1, MICRO_BATCHES)))))
        z = engine.module.loss_fn.pop_mean()
        zs.append(None if z is None else float(z))
    return {"pp2_z_total": totals, "pp2_z_terms": zs, "ref_z_total": ref_total, "ref_z": ref_z}


def rmsnorm_convert_tp_job(rank, world_size, tmpdir):
    """convert_checkpoint --to rmsnorm with non-zero LayerNorm β, then the converted RMSNorm model (with the
    q/k/v, gate/up and head biases the folding adds) at TP=2 and TP=2+SP: max logit error against the
    LayerNorm model in one process."""
    from megatron_mixln.checkpoint.rmsnorm import to_rmsnorm
    from test_parallel_rmsnorm_convert import _tokens, layernorm_model

    state = initialize_model_parallel(2, 1)
    cfg, ln_model = layernorm_model(0.3, num_query_groups=2)
    plain, new_cfg, _ = to_rmsnorm(ln_model.state_dict(), cfg, {}, "test")
    tokens = _tokens(cfg)
    with torch.no_grad():
        ref = ln_model(tokens)
    out = {"options": [new_cfg.add_qkv_bias, new_cfg.add_bias_linear, new_cfg.add_output_layer_bias]}
    for variant, sp in (("tp", False), ("sp", True)):
        model = build_model(new_cfg)
        model.load_state_dict(plain)
        apply_tensor_parallel(model, state, sequence_parallel=sp)
        with torch.no_grad():
            logits = gather_from_tp_last_dim(model(tokens), state.tp_group)
        out[variant] = float((logits - ref).abs().max())
    return out
