"""One run, one update, whatever the layout (issue 15).

The same flags -- clipping and weight decay active, Adam made SGD-like (eps = 1, lr = 1, so a wrong
gradient scale changes the step instead of being normalised away) -- must give the same parameters
after two optimizer steps under every ZeRO stage, TP (with and without SP), PP, fp32/bf16,
recomputation and compilation. The reference is written here in plain PyTorch on one process: the
unsharded model, the global batch, `torch.nn.utils.clip_grad_norm_`, `torch.optim.AdamW` with decay on
every >= 2-D tensor. The layouts run through the trainer itself (`pretrain`) on 2 processes.
Combinations DeepSpeed cannot run (ZeRO-2/3 with PP) must refuse, naming the combination.
"""
import json
import os

import pytest
import torch
import torch.nn.functional as F

from training_testlib import run_spawned, tiny_datasets

MODEL = dict(vocab_size=256, hidden_size=32, ffn_hidden_size=64, num_layers=4, num_attention_heads=4,
             num_query_groups=2, seq_length=16, norm_position="post,peri,lns,pre", normalization="LayerNorm")
TRAIN = dict(micro_batch_size=2, global_batch_size=4, train_iters=2, optimizer="adamw", lr=1.0, min_lr=1.0,
             lr_decay_style="constant", lr_warmup_iters=0, weight_decay=0.1, adam_eps=1.0, clip_grad=0.05,
             eval_iters=0, log_interval=1, grad_norm_interval=0, seed=7, wandb_mode="disabled",
             compile_backend="aot_eager")  # Dynamo + AOTAutograd as with inductor, without a C++ build per graph

# name: (ZeRO, TP, SP, PP, bf16, recompute, compile). 2 processes: DP=2, or TP=2, or PP=2.
LAYOUTS = {
    "zero0_dp2": (0, 1, False, 1, False, False, False),
    "zero1_dp2_bf16": (1, 1, False, 1, True, False, False),
    "zero2_dp2_recompute": (2, 1, False, 1, False, True, False),
    "zero3_dp2": (3, 1, False, 1, False, False, False),
    "zero3_dp2_bf16_recompute_compile": (3, 1, False, 1, True, True, True),
    "zero0_dp2_recompute_compile": (0, 1, False, 1, False, True, True),
    "zero0_tp2": (0, 2, False, 1, False, False, False),
    "zero1_tp2_sp_bf16": (1, 2, True, 1, True, False, False),
    "zero1_tp2_sp_recompute_compile": (1, 2, True, 1, False, True, True),
    "zero3_tp2_sp_recompute": (3, 2, True, 1, False, True, False),
    "zero0_pp2": (0, 1, False, 2, False, False, False),
    "zero0_pp2_bf16": (0, 1, False, 2, True, False, False),
    "zero1_pp2_recompute_compile": (1, 1, False, 2, False, True, True),
}


def _model():
    from megatron_mixln.model import ModelConfig

    return ModelConfig(**MODEL, norm_impl="torch")


def _train(zero, tp, sp, pp, bf16, recompute, compile_, run_dir=None):
    from megatron_mixln.training.config import TrainingConfig

    return TrainingConfig(**TRAIN, run_dir=run_dir, zero_stage=zero, tensor_model_parallel_size=tp, sequence_parallel=sp,
                          pipeline_model_parallel_size=pp, bf16=bf16, recompute_activations=recompute,
                          compile=compile_)


def _full_params(engine, state):
    """{plain key: fp32 tensor} of this rank's stage, TP shards gathered, ZeRO-3 partitions gathered."""
    import deepspeed

    from megatron_mixln.parallel import gather_plain_tensors

    params = list(engine.module.parameters())
    with deepspeed.zero.GatheredParameters(params) if engine.zero_optimization_stage() == 3 else _null():
        return {k: v.float().clone() for k, v in gather_plain_tensors(engine.module, state).items()}


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _optimizer_groups(engine):
    """[(weight_decay, model parameters in the group)] of the engine's optimizer. The wrappers keep the
    model's tensors of each group in their own list (ZeRO-3 empties the inner groups between steps)."""
    opt = engine.optimizer
    tensors = next((getattr(opt, a) for a in ("fp16_groups", "bit16_groups", "bf16_groups") if hasattr(opt, a)),
                   [g["params"] for g in opt.param_groups])
    return [(float(g["weight_decay"]), int(sum(getattr(p, "ds_numel", p.numel()) for p in ts)))
            for g, ts in zip(opt.param_groups, tensors)]


def _layouts_job(rank, world_size, tmpdir):
    import torch._dynamo

    from megatron_mixln.parallel import get_parallel_state
    from megatron_mixln.training.model_setup import compiled_block_count, compiled_graph_count
    from megatron_mixln.training.trainer import pretrain

    out = {}
    for name, layout in LAYOUTS.items():
        torch._dynamo.reset()  # a fresh compile cache per layout, as in a real run
        graphs_before = compiled_graph_count()
        run_dir = os.path.join(tmpdir, name)
        summary = pretrain(_model(), _train(*layout, run_dir=run_dir), tiny_datasets())
        engine = summary.engine
        state = get_parallel_state() if layout[1] * layout[3] > 1 else None
        out[name] = {
            "params": _full_params(engine, state),
            "grad_norm": [h["grad_norm"] for h in summary.history],
            "applied": [h["applied"] for h in summary.history],
            "groups": _optimizer_groups(engine),
            "compiled_blocks": compiled_block_count(engine.module, state),
            "graphs": compiled_graph_count() - graphs_before,
        }
        if rank == 0:  # what the run logged at start-up (config.json) and after its first step (metrics.jsonl)
            with open(os.path.join(run_dir, "config.json")) as fh:
                config = json.load(fh)
            with open(os.path.join(run_dir, "metrics.jsonl")) as fh:
                events = [r for r in map(json.loads, fh) if r["kind"] == "event" and r.get("event") == "compiled"]
            out[name]["logged"] = {"param_groups": config["param_groups"], "compiled_blocks": config["compiled_blocks"],
                                   "graphs": [e["graphs"] for e in events]}
        engine.destroy()
    return out


def reference(bf16_init: bool):
    """Two steps of plain PyTorch on one process: {"init", "params", "grad_norm"}."""
    from megatron_mixln.model import build_model, init_weights

    cfg = _model()
    torch.manual_seed(TRAIN["seed"])
    model = build_model(cfg)
    torch.manual_seed(TRAIN["seed"])
    init_weights(model)
    if bf16_init:  # DeepSpeed's bf16 master weights start from the bf16 model
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(p.to(torch.bfloat16).float())
    init = {k: v.detach().clone() for k, v in model.named_parameters()}
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": TRAIN["weight_decay"]},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=TRAIN["lr"], eps=TRAIN["adam_eps"])
    train, _ = tiny_datasets()
    gbs, norms = TRAIN["global_batch_size"], []
    for step in range(TRAIN["train_iters"]):
        tokens = torch.from_numpy(train.tokens[step * gbs:(step + 1) * gbs])
        logits = model(tokens[:, :-1])
        F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten()).backward()
        norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), TRAIN["clip_grad"])))
        opt.step()
        opt.zero_grad(set_to_none=True)
    return {"init": init, "params": {k: v.detach().clone() for k, v in model.named_parameters()}, "grad_norm": norms}


@pytest.fixture(scope="module")
def runs():
    return run_spawned(_layouts_job, 2)


@pytest.fixture(scope="module")
def references():
    return {False: reference(False), True: reference(True)}


def _merged(runs, name):
    params = {}
    for rank_result in runs:  # PP: each rank holds one stage; DP/TP: both hold everything
        params.update(rank_result[name]["params"])
    return params


@pytest.mark.slow
@pytest.mark.parametrize("name", list(LAYOUTS))
def test_layout_gives_the_reference_update(runs, references, name):
    zero, tp, sp, pp, bf16, recompute, compile_ = LAYOUTS[name]
    ref = references[bf16]
    got = _merged(runs, name)
    assert set(got) == set(ref["params"])
    # The clip really bites (the pre-clip norm is far above --clip-grad) and weight decay is visible.
    assert min(ref["grad_norm"]) > 10 * TRAIN["clip_grad"]
    # fp32: summation order only. bf16: forward/backward in bf16 (~3 significant digits per gradient)
    # and bf16 weights: the update must agree to a few bf16 ulps of the update itself.
    rtol = 2e-2 if bf16 else 1e-4
    for key, want in ref["params"].items():
        update_ref = want - ref["init"][key]
        update_got = got[key] - ref["init"][key]
        scale = float(update_ref.abs().max())
        # bf16 weights are stored rounded: allow half an ulp of the weight on top
        slack = float(want.abs().max()) * 2.0**-8 if bf16 else 0.0
        err = float((update_got - update_ref).abs().max())
        assert err <= rtol * scale + slack, (name, key, err, scale, slack)
    for rank_result in runs:
        r = rank_result[name]
        assert r["applied"] == [True, True]
        # the logged norm is the whole model's pre-clip norm on every rank
        assert r["grad_norm"] == pytest.approx(ref["grad_norm"], rel=2e-2 if bf16 else 1e-4), name
        # the engine's optimizer decays (>= 1 group with --weight-decay, holding parameters)
        wds = {wd for wd, n in r["groups"] if n > 0}
        assert wds == {TRAIN["weight_decay"], 0.0}, (name, r["groups"])
        if compile_:
            assert r["compiled_blocks"] == MODEL["num_layers"] and r["graphs"] > 0, (name, r)
        else:
            assert r["compiled_blocks"] == 0 and r["graphs"] == 0
    # the start-up log: the whole model's groups (TP shards and stages summed) and what was compiled
    logged = runs[0][name]["logged"]
    init = ref["init"]
    assert logged["param_groups"] == {
        "decay_tensors": sum(v.ndim >= 2 for v in init.values()),
        "decay_parameters": sum(v.numel() for v in init.values() if v.ndim >= 2),
        "no_decay_tensors": sum(v.ndim < 2 for v in init.values()),
        "no_decay_parameters": sum(v.numel() for v in init.values() if v.ndim < 2)}, name
    assert logged["compiled_blocks"] == (MODEL["num_layers"] if compile_ else 0)
    if compile_:  # the first-step count (later steps may add recompilations)
        assert len(logged["graphs"]) == 1 and 0 < logged["graphs"][0] <= runs[0][name]["graphs"]
    else:
        assert logged["graphs"] == []


@pytest.mark.parametrize("zero", [2, 3])
def test_zero_2_3_with_pipeline_refused_naming_the_combination(zero):
    from megatron_mixln.errors import UsageError

    with pytest.raises(UsageError, match=f"--pipeline-model-parallel-size 2 with --zero-stage {zero}"):
        _train(zero, 1, False, 2, False, False, False)


@pytest.mark.parametrize("zero", [2, 3])
def test_zero_2_3_with_pipeline_refused_from_a_deepspeed_json(tmp_path, zero):
    """The stage may come from --deepspeed-config instead of --zero-stage."""
    import json

    from megatron_mixln.errors import UsageError
    from megatron_mixln.training.config import TrainingConfig
    from megatron_mixln.training.ds_config import build_ds_config

    path = tmp_path / f"zero{zero}.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": zero}}))
    cfg = TrainingConfig(**TRAIN, pipeline_model_parallel_size=2, deepspeed_config=str(path))
    with pytest.raises(UsageError, match=f"ZeRO stage {zero} with --pipeline-model-parallel-size 2"):
        build_ds_config(cfg, 4, 1)
