"""Jobs run on several processes by the tests (see spawn_testlib.run_spawned).

Every job compares a parallel layout against a single-process computation done in the same process
from the same seed, and returns errors/losses as plain numbers for the test to assert on.
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from megatron_mixln.diagnostics import layer_grad_norms
from megatron_mixln.model import ModelConfig, build_model, count_parameters
from megatron_mixln.parallel import (
    allreduce_sequence_parallel_grads, apply_tensor_parallel, gather_from_tp_last_dim, gather_plain_tensors,
    global_grad_norm, global_num_parameters, initialize_model_parallel, tensor_parallel_grad_getter, vocab_parallel_cross_entropy,
)

TINY = dict(vocab_size=128, hidden_size=32, ffn_hidden_size=64, num_layers=2, num_attention_heads=4, seq_length=8)

# one model per norm position (+ Mix-LN, GQA, LayerNorm with bias, tied embeddings)
TP_CASES = {
    "pre": dict(norm_position="pre"),
    "post": dict(norm_position="post"),
    "peri": dict(norm_position="peri"),
    "lns": dict(norm_position="lns", num_layers=3),
    "deepnorm": dict(norm_position="deepnorm"),
    "deeppost": dict(norm_position="deeppost"),
    "mix": dict(norm_position="mix", num_layers=4, post_ln_layers=2),
    "peri_layernorm_gqa": dict(norm_position="peri", normalization="LayerNorm", num_query_groups=2),
    "post_gqa_tied": dict(norm_position="post", num_query_groups=2, tie_embeddings=True),
    "siamese": dict(norm_position="siamese", num_layers=3),
    "siamese_hybrid_pre": dict(norm_position="siamese", siamese_variant="hybrid_pre"),
    "residual_dual_layernorm_gqa": dict(norm_position="residual-dual", normalization="LayerNorm", num_query_groups=2),
}


def tiny_config(**overrides) -> ModelConfig:
    return ModelConfig(**{**TINY, "norm_impl": "torch", **overrides})


def batch(cfg, batch_size=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, cfg.vocab_size, (batch_size, cfg.seq_length + 1), generator=g)
    return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()


def _max_err(a: dict, b: dict, keys=None) -> float:
    keys = keys if keys is not None else a.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in keys)


def _norm_keys(keys):
    return [k for k in keys if "norm" in k]


def tp_equivalence_job(rank, world_size, tmpdir):
    """TP=2 (with and without SP) vs TP=1: logits, loss and every gradient, per case."""
    state = initialize_model_parallel(2, 1)
    out = {}
    for case, overrides in TP_CASES.items():
        cfg = tiny_config(**overrides)
        torch.manual_seed(0)
        ref = build_model(cfg)
        tokens, labels = batch(cfg)
        ref_logits = ref(tokens)
        ref_loss = F.cross_entropy(ref_logits.flatten(0, 1), labels.flatten())
        ref_loss.backward()
        ref_grads = {k: p.grad for k, p in ref.named_parameters()}
        ref_layer_norms = layer_grad_norms(ref)
        ref_grad_norm = float(torch.sqrt(sum(g.double().pow(2).sum() for g in ref_grads.values())))
        ref.zero_grad(set_to_none=True)

        # (variant, sequence_parallel, hooks, call allreduce_sequence_parallel_grads)
        for variant, sp, hooks, manual in (("tp", False, True, False), ("sp", True, True, False),
                                           ("sp_manual", True, False, True), ("sp_unsynced", True, False, False)):
            model = copy.deepcopy(ref)
            apply_tensor_parallel(model, state, sequence_parallel=sp, sp_grad_hooks=hooks)
            logits_shard = model(tokens)
            loss = vocab_parallel_cross_entropy(logits_shard, labels).mean()
            loss.backward()
            if manual:
                allreduce_sequence_parallel_grads(model, state)
            grads = gather_plain_tensors(model, state, grads=True)
            params = gather_plain_tensors(model, state)
            prefix = f"{case}/{variant}"
            out[f"{prefix}/logits"] = float((gather_from_tp_last_dim(logits_shard, state.tp_group) - ref_logits).abs().max())
            out[f"{prefix}/loss"] = abs(float(loss) - float(ref_loss))
            out[f"{prefix}/grads"] = _max_err(grads, ref_grads)
            out[f"{prefix}/norm_grads"] = _max_err(grads, ref_grads, _norm_keys(ref_grads))
            out[f"{prefix}/num_norm_grads"] = len(_norm_keys(grads))
            out[f"{prefix}/params"] = _max_err(params, dict(ref.named_parameters()))
            out[f"{prefix}/logit_shard_width"] = logits_shard.shape[-1]
            out[f"{prefix}/num_parameters"] = global_num_parameters(model, state) - count_parameters(ref)
            out[f"{prefix}/grad_norm"] = abs(global_grad_norm(model, state) - ref_grad_norm)
            rows = layer_grad_norms(model, tensor_parallel_grad_getter(state))
            out[f"{prefix}/layer_grad_norms"] = max(
                abs(row[k] - ref_row[k]) for row, ref_row in zip(rows, ref_layer_norms) for k in ref_row if k not in ("layer", "position"))
    return out


# ---------------------------------------------------------------- DeepSpeed engines (4 processes)

DS_CASE = dict(norm_position="post,peri,lns,deepnorm", num_layers=4, num_query_groups=2)
MICRO_BATCHES, GLOBAL_BATCH = 2, 4


def _deepspeed():
    import deepspeed

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # skip a 30 s op build on CPU
    deepspeed.init_distributed(dist_backend="gloo")
    return deepspeed


def ds_config(micro_batch: int, grad_accum: int, dp: int, zero_stage: int) -> dict:
    return {
        "train_micro_batch_size_per_gpu": micro_batch, "gradient_accumulation_steps": grad_accum,
        "train_batch_size": micro_batch * grad_accum * dp, "zero_optimization": {"stage": zero_stage},
        "zero_allow_untested_optimizer": True, "steps_per_print": 10**9, "gradient_clipping": 0.0,
    }


def step_batch(cfg, step: int):
    """The global batch of a training step (the same whatever the layout)."""
    return batch(cfg, GLOBAL_BATCH, seed=1000 + step)


def rows_of(tokens, labels, dp_rank: int, dp: int, micro_batches: int):
    """This DP rank's micro-batches of a global batch."""
    per_rank = tokens.shape[0] // dp
    t, l = tokens[dp_rank * per_rank:(dp_rank + 1) * per_rank], labels[dp_rank * per_rank:(dp_rank + 1) * per_rank]
    return list(zip(t.chunk(micro_batches), l.chunk(micro_batches)))


def sgd(params):
    return torch.optim.SGD(params, lr=0.5)


def adamw(params):
    return torch.optim.AdamW(params, lr=1e-2, weight_decay=0.01)


def warmup(optimizer):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / 4))


def reference_losses(cfg, state_dict, make_optimizer, steps, make_scheduler=None):
    """Single-process training of the plain model: the numbers every layout must reproduce."""
    model = build_model(cfg)
    model.load_state_dict(state_dict)
    opt = make_optimizer(model.parameters())
    sched = make_scheduler(opt) if make_scheduler else None
    losses = []
    for step in steps:
        tokens, labels = step_batch(cfg, step)
        total = 0.0
        for t, l in rows_of(tokens, labels, 0, 1, GLOBAL_BATCH):  # one sample per micro-batch
            loss = F.cross_entropy(model(t).flatten(0, 1), l.flatten()) / GLOBAL_BATCH
            loss.backward()
            total += float(loss.detach())
        opt.step()
        opt.zero_grad(set_to_none=True)
        if sched:
            sched.step()
        losses.append(total)
    return losses


def pipeline_engine(deepspeed, cfg, state, make_optimizer, make_scheduler=None, zero_stage=0, sequence_parallel=False,
                    partition_method="parameters", state_dict=None, seed=0, activation_checkpoint_interval=0):
    from megatron_mixln.parallel import build_pipeline_module, check_deepspeed_config, load_plain_state_dict

    pipe = build_pipeline_module(cfg, state, partition_method=partition_method, sequence_parallel=sequence_parallel,
                                 seed=seed, activation_checkpoint_interval=activation_checkpoint_interval)
    if state_dict is not None:
        load_plain_state_dict(pipe, state_dict, state)
    opt = make_optimizer(pipe.parameters())
    micro = GLOBAL_BATCH // (state.dp_size * MICRO_BATCHES)
    config = check_deepspeed_config(ds_config(micro, MICRO_BATCHES, state.dp_size, zero_stage), state, sequence_parallel)
    engine, *_ = deepspeed.initialize(model=pipe, optimizer=opt, lr_scheduler=make_scheduler(opt) if make_scheduler else None,
                                      config=config)
    return engine


def pipeline_train(engine, cfg, state, steps):
    losses = []
    for step in steps:
        tokens, labels = step_batch(cfg, step)
        losses.append(float(engine.train_batch(iter(rows_of(tokens, labels, state.dp_rank, state.dp_size, MICRO_BATCHES)))))
    return losses


def plain_engine(deepspeed, cfg, state, make_optimizer, make_scheduler=None, zero_stage=0, sequence_parallel=False,
                 state_dict=None, micro_batches=1):
    torch.manual_seed(0)
    model = build_model(cfg)
    if state_dict is not None:
        model.load_state_dict(state_dict)
    apply_tensor_parallel(model, state, sequence_parallel=sequence_parallel)
    opt = make_optimizer(model.parameters())
    micro = GLOBAL_BATCH // (state.dp_size * micro_batches)
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, lr_scheduler=make_scheduler(opt) if make_scheduler else None,
                                      config=ds_config(micro, micro_batches, state.dp_size, zero_stage),
                                      mpu=state.mpu)
    return engine


def plain_train(engine, cfg, state, steps):
    """One optimizer step per global batch, over `gradient_accumulation_steps` micro-batches."""
    import torch.distributed as dist

    micro_batches = engine.gradient_accumulation_steps()
    losses = []
    for step in steps:
        tokens, labels = step_batch(cfg, step)
        total = torch.zeros(())
        for t, l in rows_of(tokens, labels, state.dp_rank, state.dp_size, micro_batches):
            loss = vocab_parallel_cross_entropy(engine(t), l).mean()
            engine.backward(loss)
            engine.step()
            total += loss.detach() / micro_batches
        dist.all_reduce(total, group=state.dp_group)
        losses.append(float(total) / state.dp_size)
    return losses


def load_converted_checkpoint(engine, ckpt_dir: str, tag: str | None = None):
    """Resume a DeepSpeed engine from a converted checkpoint (no optimizer states in it).

    `engine.load_checkpoint(..., load_optimizer_states=False)` restores weights, step counters, the
    LR scheduler and client state, but the optimizer's param_groups keep the learning rate they were
    built with (normally it comes back with the optimizer state). Schedulers only write the LR at
    their next step(), so the first resumed step would use a stale LR: it is re-applied here (the
    trainer needs none of this: it sets the LR from its schedule before every step).
    """
    result = engine.load_checkpoint(ckpt_dir, tag, load_optimizer_states=False)
    sched = engine.lr_scheduler
    if sched is not None:
        lrs = sched.get_last_lr() if isinstance(sched, torch.optim.lr_scheduler.LRScheduler) else sched.get_lr()
        for group, lr in zip(engine.optimizer.param_groups, lrs):
            group["lr"] = lr
    return result


def deepspeed_layouts_job(rank, world_size, tmpdir):
    """PP=2 x DP=2; TP=2 x PP=2 (+SP, ZeRO-1), saved, converted, resumed at TP=1 x PP=1 and back at
    TP=2 x PP=2; DP=2 x TP=2 with ZeRO-1, and with SP + accumulation under ZeRO-2/3. Every loss is compared
    with single-process training."""
    import os

    import torch.distributed as dist

    from megatron_mixln.model import init_weights
    from megatron_mixln.parallel import gather_plain_tensors
    from megatron_mixln.checkpoint.convert import convert

    deepspeed = _deepspeed()
    cfg = tiny_config(**DS_CASE)
    torch.manual_seed(0)
    sd0 = {k: v.clone() for k, v in build_model(cfg).state_dict().items()}
    out = {}

    # PP=2 x DP=2, uniform partition, AdamW, ZeRO-0
    state = initialize_model_parallel(1, 2)
    engine = pipeline_engine(deepspeed, cfg, state, adamw, partition_method="uniform", state_dict=sd0)
    out["pp2_dp2"] = pipeline_train(engine, cfg, state, range(3))
    out["pp2_dp2_ref"] = reference_losses(cfg, sd0, adamw, range(3))
    out["pp2_dp2_parts"] = list(engine.module.parts)
    del engine

    # TP=2 x PP=2 without SP (DeepSpeed splits stage-to-stage activations over TP), activation checkpointing
    state = initialize_model_parallel(2, 2)
    engine = pipeline_engine(deepspeed, cfg, state, adamw, state_dict=sd0, activation_checkpoint_interval=1)
    out["tp2_pp2"] = pipeline_train(engine, cfg, state, range(3))
    out["tp2_pp2_ref"] = out["pp2_dp2_ref"]
    out["tp2_pp2_pipe_partitioned"] = bool(engine.is_pipe_partitioned)
    del engine

    # TP=2 x PP=2 with sequence parallelism and ZeRO-1, SGD + LR warm-up; checkpoint after 3 steps
    state = initialize_model_parallel(2, 2)
    engine = pipeline_engine(deepspeed, cfg, state, sgd, warmup, zero_stage=1, sequence_parallel=True, state_dict=sd0)
    out["tp2_pp2_sp"] = pipeline_train(engine, cfg, state, range(3))
    out["tp2_pp2_sp_pipe_partitioned"] = bool(engine.is_pipe_partitioned)
    engine.save_checkpoint(os.path.join(tmpdir, "ckpt_tp2_pp2"), tag="step3", client_state={"iteration": 3})
    out["tp2_pp2_sp_continued"] = pipeline_train(engine, cfg, state, range(3, 5))
    out["tp2_pp2_sp_ref"] = reference_losses(cfg, sd0, sgd, range(5), warmup)
    del engine

    dist.barrier()
    if rank == 0:  # DeepSpeed TP2xPP2 -> plain -> DeepSpeed TP1xPP1 (plain engine) and back to TP2xPP2
        plain_dir = os.path.join(tmpdir, "plain")
        convert(os.path.join(tmpdir, "ckpt_tp2_pp2"), plain_dir, to="plain", config=cfg)
        convert(plain_dir, os.path.join(tmpdir, "ckpt_tp1_pp1"), to="deepspeed", tp=1, pp=1, out_tag="step3")
        convert(plain_dir, os.path.join(tmpdir, "ckpt_back"), to="deepspeed", tp=2, pp=2, out_tag="step3")
    dist.barrier()

    # resume at TP=1 x PP=1 (DP=4, plain engine): the next losses must continue the TP2xPP2 run
    state = initialize_model_parallel(1, 1)
    engine = plain_engine(deepspeed, cfg, state, sgd, warmup)
    load_converted_checkpoint(engine, os.path.join(tmpdir, "ckpt_tp1_pp1"))
    out["resume_tp1_global_steps"] = engine.global_steps
    out["resume_tp1"] = plain_train(engine, cfg, state, range(3, 5))
    del engine

    # and back: TP=2 x PP=2 from the converted checkpoint; before loading, check the pipeline's own init
    state = initialize_model_parallel(2, 2)
    engine = pipeline_engine(deepspeed, cfg, state, sgd, warmup, zero_stage=1, sequence_parallel=True, seed=7)
    expected = build_model(cfg, device="meta")
    expected.to_empty(device="cpu")
    torch.manual_seed(7)
    init_weights(expected)
    expected = expected.state_dict()
    got = gather_plain_tensors(engine.module, state)
    out["pipeline_init_err"] = max(float((v - expected[k]).abs().max()) for k, v in got.items())
    load_converted_checkpoint(engine, os.path.join(tmpdir, "ckpt_back"))
    out["resume_back"] = pipeline_train(engine, cfg, state, range(3, 5))
    del engine

    # DP=2 x TP=2, ZeRO-1, AdamW (plain engine, DeepSpeed shards the optimizer over DP only)
    state = initialize_model_parallel(2, 1)
    engine = plain_engine(deepspeed, cfg, state, adamw, zero_stage=1, state_dict=sd0)
    out["dp2_tp2_zero1"] = plain_train(engine, cfg, state, range(3))
    out["dp2_tp2_zero1_ref"] = out["pp2_dp2_ref"]
    out["dp2_tp2_zero1_partition_count"] = int(engine.optimizer.partition_count[0]) if hasattr(engine.optimizer, "partition_count") else -1
    del engine

    # DP=2 x TP=2 with sequence parallelism, 2 accumulated micro-batches per step, ZeRO-2 and ZeRO-3
    # (DeepSpeed partitions the TP shards over DP). SGD, not Adam: Adam's update hardly changes when
    # a gradient is scaled, so it would not see norm gradients summed over TP twice (or tp times).
    out["dp2_tp2_sp_ref"] = reference_losses(cfg, sd0, sgd, range(3))
    for stage in (2, 3):
        engine = plain_engine(deepspeed, cfg, state, sgd, zero_stage=stage, sequence_parallel=True, state_dict=sd0,
                              micro_batches=MICRO_BATCHES)
        out[f"dp2_tp2_sp_zero{stage}"] = plain_train(engine, cfg, state, range(3))
        out[f"dp2_tp2_sp_zero{stage}_partitioned"] = all(hasattr(p, "ds_id") for p in engine.module.parameters())
        del engine
    return out
