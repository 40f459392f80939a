"""The model-state formulas against a real DeepSpeed engine (2 ranks, gloo, CPU, bf16 and fp32, ZeRO 0-3) and
against DeepSpeed's own estimators; parameter counts against the built model."""
import math

import pytest
import torch

from planning_testlib import reachable_tensors, storage_bytes
from spawn_testlib import run_spawned

from megatron_mixln.model import ModelConfig, build_model, count_parameters
from megatron_mixln.planning import Layout, model_states, param_counts, zero_buffers
from megatron_mixln.planning.plan import deepspeed_estimate

TINY = dict(vocab_size=256, hidden_size=64, ffn_hidden_size=128, num_layers=2, num_attention_heads=4,
            num_query_groups=2, seq_length=16, norm_position="mix", post_ln_layers=1)
ZERO = dict(reduce_bucket_size=1000, allgather_bucket_size=1000, stage3_prefetch_bucket_size=1000,
            stage3_param_persistence_threshold=0)


def _measure_engine(stage: int, bf16: bool) -> dict:
    """Bytes per rank held by a real engine: its weights, and every distinct storage reachable from it
    after the backward, after the step, and (at most) while the inner optimizer steps."""
    from megatron_mixln.training.config import TrainingConfig
    from megatron_mixln.training.ds_config import build_ds_config
    from megatron_mixln.training.model_setup import build_model_and_optimizer

    model_cfg = ModelConfig(**TINY)
    cfg = TrainingConfig(micro_batch_size=2, global_batch_size=4, train_iters=2, lr=1e-3, bf16=bf16, zero_stage=stage)
    ds = build_ds_config(cfg, 4, 1, model_cfg.hidden_size)
    ds["zero_optimization"].update(ZERO)
    engine = build_model_and_optimizer(model_cfg, cfg, ds)
    inner = getattr(engine.optimizer, "optimizer", engine.optimizer)

    def weights():
        return sum(storage_bytes([getattr(p, "ds_tensor", p) for p in engine.module.parameters()]).values())

    def held():
        found = reachable_tensors(engine.optimizer)
        found += [getattr(p, "ds_tensor", p) for p in engine.module.parameters()]
        found += [p.grad for p in engine.module.parameters()]
        found += [p for g in inner.param_groups for p in g["params"]]  # the inner optimizer's current view
        found += [p.grad for g in inner.param_groups for p in g["params"]]
        return sum(storage_bytes(found).values())

    seen = {}
    original_step = inner.step

    def step(*args, **kwargs):  # DeepSpeed steps the inner optimizer with the fp32 gradients attached
        seen["during_step"] = max(seen.get("during_step", 0), held())
        return original_step(*args, **kwargs)

    inner.step = step
    torch.manual_seed(0)
    for _ in range(2):  # the second step sees Adam's states already allocated
        seen.pop("during_step", None)
        tokens = torch.randint(0, TINY["vocab_size"], (2, 17))
        loss = torch.nn.functional.cross_entropy(engine(tokens[:, :-1]).float().flatten(0, 1), tokens[:, 1:].flatten())
        engine.backward(loss)
        seen["after_backward"] = held()
        engine.step()
    seen.update(weights=weights(), after_step=held())
    engine.destroy()
    return seen


def _job(rank, world_size, tmpdir):
    import deepspeed

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False, verbose=False)
    return {(stage, bf16): _measure_engine(stage, bf16) for stage in (0, 1, 2, 3) for bf16 in (True, False)}


@pytest.fixture(scope="module")
def measured():
    return run_spawned(_job, 2)


@pytest.mark.slow
@pytest.mark.parametrize("bf16", [True, False], ids=["bf16", "fp32"])
@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_model_states_match_a_real_engine(measured, stage, bf16):
    model = ModelConfig(**TINY)
    layout = Layout(nodes=1, gpus_per_node=2, zero_stage=stage, bf16=bf16)
    predicted = model_states(model, layout)
    bucket = zero_buffers({"stage": stage, **ZERO}, layout, model).get("reduce bucket", 0)  # ZeRO-3 keeps it
    close = lambda got, want, rel: math.isclose(got, want, rel_tol=rel, abs_tol=128)  # noqa: E731  (scalars)
    for rank in measured:
        got = rank[(stage, bf16)]
        assert got["weights"] == predicted.weights, got
        # ZeRO-3 keeps its flat 16-bit gradient partition for the whole run; the other stages free
        # their gradients after the step, and the backward makes them again.
        kept_grads = predicted.grads if stage == 3 else 0
        # After the step: weights, optimizer states (fp32 master + Adam), ZeRO-3's reduce bucket and grads.
        assert close(got["after_step"] - got["weights"], predicted.optimizer + bucket + kept_grads, 2e-3), \
            (got, predicted)
        # The backward adds the gradients (partitions padded to an alignment: small tolerance).
        assert close(got["after_backward"] - got["after_step"], predicted.grads - kept_grads, 2e-3), (got, predicted)
        # The step adds the fp32 gradients; ZeRO-1/2 build them one parameter group at a time (the
        # norm-gain group is < 1% of this model), so the planner's figure is an upper bound.
        surplus = got["during_step"] - got["after_backward"]
        assert surplus <= predicted.fp32_grads * 1.002 + 128 and close(surplus, predicted.fp32_grads, 1e-2), \
            (got, predicted)


@pytest.mark.parametrize("nodes, gpus", [(1, 8), (4, 8), (16, 8)])
@pytest.mark.parametrize("stage, offload_opt, offload_param", [
    (1, False, False), (2, False, False), (2, True, False), (3, False, False), (3, True, False), (3, True, True)])
def test_agrees_with_deepspeeds_estimators(nodes, gpus, stage, offload_opt, offload_param):
    """ZeRO-1/2: exactly DeepSpeed's 2P + 18P/N (2P with offload). ZeRO-3: DeepSpeed's 4 x largest layer +
    18P/N plus the 16-bit gradient partition (2P/N) that DeepSpeed's stage-3 estimator leaves out but its
    engine holds during the step (see the engine test); with offload the gradients leave the GPU and the
    two agree exactly. CPU: DeepSpeed's figure is ours per node times its 1.5 buffer factor (ZeRO-3, zero.Init)."""
    pytest.importorskip("deepspeed")
    model = ModelConfig.from_preset("7b", norm_position="mix", post_ln_layers=2)
    layout = Layout(nodes=nodes, gpus_per_node=gpus, zero_stage=stage, offload_optimizer=offload_opt,
                    offload_param=offload_param, bf16=True)
    ours = model_states(model, layout)
    theirs = deepspeed_estimate(model, layout)
    p, n = param_counts(model)["total"], nodes * gpus
    extra = 0 if (stage < 3 or offload_opt) else 2 * p / n
    assert abs(ours.gpu - (theirs["gpu"] + extra)) <= 4, (ours, theirs)
    if stage == 3 and offload_opt:
        assert abs(1.5 * ours.cpu_per_rank * gpus - theirs["cpu"]) <= 16 * gpus, (ours, theirs)


@pytest.mark.parametrize("overrides", [
    dict(preset="7b"), dict(preset="1b", norm_position="peri"), dict(preset="9m", tie_embeddings=True),
    dict(preset="20m", normalization="LayerNorm", num_query_groups=2, final_norm=False),
    dict(preset="9m", norm_position="siamese", normalization="LayerNorm"), dict(preset="9m", norm_position="residual-dual"),
    dict(preset="9m", norm_position="siamese", siamese_variant="hybrid_pre", normalization="LayerNorm"),
    # the norm zoo: q/k(/v) norms, HybridNorm's single residual norm, DyT/Derf scalars
    dict(preset="20m", norm_position="reordered", qk_norm="full", num_query_groups=2),
    dict(preset="9m", norm_position="hybridnorm-star", normalization="Derf", qk_norm_per_head_gain=True, num_query_groups=2),
    dict(preset="9m", norm_position="pre,peri,hybrid,reordered", normalization="DyT", dyt_bias=True, qk_norm="head",
         learnable_embedding_scale=True),
    # linear biases: q/k/v (Qwen2), every linear, the LM head
    dict(preset="9m", add_qkv_bias=True, num_query_groups=2),
    dict(preset="20m", add_bias_linear=True, add_output_layer_bias=True),
    dict(preset="9m", add_output_layer_bias=True, tie_embeddings=True)])
def test_param_counts_match_the_model(overrides):
    overrides = dict(overrides)
    model_cfg = ModelConfig.from_preset(overrides.pop("preset"), **overrides)
    model = build_model(model_cfg, device="meta")
    counts = param_counts(model_cfg)
    assert counts["total"] == count_parameters(model)
    assert counts["rank"] == counts["total"]  # one rank holds everything without TP/PP
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    assert counts["largest_layer"] == largest  # DeepSpeed's model_to_params definition
    # Pipeline stages: the fullest stage holds its layers plus the embedding (first) or head (last).
    pp = 2 if model_cfg.num_layers % 2 == 0 else 1
    stages = [sum(p.numel() for layer in model.layers[s * model_cfg.num_layers // pp:(s + 1) * model_cfg.num_layers // pp]
                  for p in layer.parameters()) for s in range(pp)]
    stages[0] += model.embed.weight.numel() + (1 if model.embed_scale is not None else 0)  # the embedding's scale
    stages[-1] += sum(p.numel() for p in model.final_norm.parameters()) + sum(p.numel() for p in model.lm_head.parameters())
    assert param_counts(model_cfg, pp=pp)["rank"] == max(stages)
