"""Activation checkpointing and torch.compile are applied from outside, change no parameter name,
compose with each other, and compute the same thing; weight decay skips norm gains and biases,
whatever shape ZeRO-3 left the parameters in."""
import copy

import pytest
import torch
import torch.nn.functional as F

from training_testlib import tiny_model

from megatron_mixln.model import build_model
from megatron_mixln.training.model_setup import apply_activation_checkpointing, apply_compile
from megatron_mixln.training.param_groups import param_groups


def _loss_and_grads(model, tokens):
    model.zero_grad()
    logits = model(tokens[:, :-1])
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}


def _pair():
    torch.manual_seed(0)
    model = build_model(tiny_model(num_layers=3, norm_position="mix", post_ln_layers=1))
    return model, copy.deepcopy(model), torch.randint(0, 256, (2, 17))


def test_activation_checkpointing_recomputes_the_same_gradients():
    plain, wrapped, tokens = _pair()
    apply_activation_checkpointing(wrapped)
    assert list(wrapped.state_dict()) == list(plain.state_dict())  # checkpoints stay interchangeable
    # The blocks' activations are really dropped: backward re-runs each block's forward.
    calls = []
    for block in wrapped.layers:
        block.attn.register_forward_hook(lambda *a: calls.append(1))
    loss_a, grads_a = _loss_and_grads(plain, tokens)
    loss_b, grads_b = _loss_and_grads(wrapped, tokens)
    assert len(calls) == 2 * 3  # forward + recompute in backward, per block
    assert loss_a == loss_b
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], rtol=0, atol=0)


def test_compile_per_block_keeps_names_and_outputs():
    plain, compiled, tokens = _pair()
    apply_compile(compiled, backend="eager")  # the inductor backend needs a C++ toolchain; same wiring
    assert list(compiled.state_dict()) == list(plain.state_dict())
    assert all(block._compiled_call_impl is not None for block in compiled.layers)
    loss_a, grads_a = _loss_and_grads(plain, tokens)
    loss_b, grads_b = _loss_and_grads(compiled, tokens)
    assert abs(loss_a - loss_b) < 1e-6
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], rtol=1e-5, atol=1e-7)


def test_weight_decay_groups():
    model = build_model(tiny_model(tie_embeddings=True))
    decay, no_decay = param_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.ndim == 2 for p in decay["params"]) and all(p.ndim == 1 for p in no_decay["params"])
    n_norms = sum(1 for n, _ in model.named_parameters() if "norm" in n)
    assert len(no_decay["params"]) == n_norms
    assert len(decay["params"]) + len(no_decay["params"]) == len({id(p) for p in model.parameters()})  # tied once


def test_recompute_under_zero3_trains_identically(single_rank):
    from training_testlib import run_and_destroy, tiny_datasets, tiny_train

    runs = [run_and_destroy(tiny_model(), tiny_train(zero_stage=3, recompute_activations=rc, train_iters=3, eval_iters=0),
                            tiny_datasets()) for rc in (False, True)]
    assert [h["loss"] for h in runs[0]["history"]] == [h["loss"] for h in runs[1]["history"]]


def _recording_backend(graphs):
    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward  # run the captured graph as it is (checkpoint regions included)

    return backend


def test_compile_and_recompute_both_take_effect_in_either_order():
    """--compile with --recompute-activations: every block is compiled, and the graph Dynamo captured
    holds the checkpointed region (the activation-checkpoint higher-order op); gradients equal eager.
    Before the fix the checkpoint wrapper hid the block from Dynamo: 0 graphs, silently eager."""
    import torch._dynamo

    from megatron_mixln.training.model_setup import compiled_graph_count

    plain, _, tokens = _pair()
    loss_a, grads_a = _loss_and_grads(plain, tokens)
    for order in ("recompute_then_compile", "compile_then_recompute"):
        torch._dynamo.reset()
        model, graphs = copy.deepcopy(plain), []
        before = compiled_graph_count()
        if order == "recompute_then_compile":
            apply_activation_checkpointing(model)
            n = apply_compile(model, backend=_recording_backend(graphs))
        else:
            n = apply_compile(model, backend=_recording_backend(graphs))
            apply_activation_checkpointing(model)
        loss_b, grads_b = _loss_and_grads(model, tokens)
        assert n == 3 and compiled_graph_count() - before == len(graphs) >= 2, order  # a post and a pre block
        assert all("tag_activation_checkpoint" in gm.code for gm in graphs), order
        assert abs(loss_a - loss_b) < 1e-6
        for name in grads_a:
            torch.testing.assert_close(grads_b[name], grads_a[name], rtol=1e-5, atol=1e-7)


def test_weight_decay_groups_from_structure_not_shapes():
    """The groups depend on what a parameter is, not on its (possibly ZeRO-3-partitioned) shape: with
    every shape replaced by (0,) -- as zero.Init leaves them, the true shape in `ds_shape` -- the split
    is the same as on the plain model, where it is the >= 2-D rule."""
    from megatron_mixln.training.param_groups import split_decay

    model = build_model(tiny_model(num_layers=3, norm_position="peri", post_ln_layers=None, normalization="LayerNorm",
                                   add_bias_linear=True, add_output_layer_bias=True))
    decay, no_decay = split_decay(model)
    assert [id(p) for p in decay] == [id(p) for p in model.parameters() if p.ndim >= 2]
    assert [id(p) for p in no_decay] == [id(p) for p in model.parameters() if p.ndim < 2]
    # LayerNorm biases and the linears' biases (Megatron-LM: no decay on biases) are in no_decay
    no_decay_ids = {id(p) for p in no_decay}
    assert all(id(p) in no_decay_ids for n, p in model.named_parameters() if n.endswith("bias"))
    assert id(model.lm_head.bias) in no_decay_ids and id(model.layers[0].attn.o_proj.bias) in no_decay_ids
    for p in model.parameters():
        p.ds_shape = p.shape
        p.data = torch.empty(0)
    decay2, no_decay2 = split_decay(model)
    assert [id(p) for p in decay2] == [id(p) for p in decay] and [id(p) for p in no_decay2] == [id(p) for p in no_decay]


def test_zero3_engine_keeps_weight_decay(single_rank):
    """Under ZeRO-3's partitioned construction the engine's optimizer still has the decay group."""
    from megatron_mixln.training.ds_config import build_ds_config
    from megatron_mixln.training.model_setup import build_model_and_optimizer
    from training_testlib import tiny_train

    cfg = tiny_train(zero_stage=3, weight_decay=0.5)
    engine = build_model_and_optimizer(tiny_model(), cfg, build_ds_config(cfg, 4, 2))
    try:
        # ZeRO-3 keeps each group's model tensors in fp16_groups (it empties the inner groups between steps)
        groups = {g["weight_decay"]: sum(p.ds_numel for p in tensors)
                  for g, tensors in zip(engine.optimizer.param_groups, engine.optimizer.fp16_groups)}
        plain = build_model(tiny_model())
        assert groups == {0.5: sum(p.numel() for p in plain.parameters() if p.ndim >= 2),
                          0.0: sum(p.numel() for p in plain.parameters() if p.ndim < 2)}
    finally:
        engine.destroy()


def test_zero3_gathers_the_learnable_embedding_scale(single_rank):
    """--learnable-embedding-scale under ZeRO-3's partitioned construction: the scale is applied as a module call,
    so ZeRO-3's hooks gather it (the engine's logits equal the plain model's from the same seed), and it sits
    in the no-decay group (like the DyT/Derf code's other scalars in this stack: gains are never decayed)."""
    from megatron_mixln.training.ds_config import build_ds_config
    from megatron_mixln.training.model_setup import build_model_and_optimizer, build_plain_model
    from training_testlib import tiny_train

    cfg = tiny_train(zero_stage=3, weight_decay=0.5)
    model_cfg = tiny_model(normalization="DyT", norm_position="pre", post_ln_layers=None, learnable_embedding_scale=True)
    ds_config = build_ds_config(cfg, 4, 2)
    ds_config["zero_optimization"]["stage3_param_persistence_threshold"] = 0  # partition even a (1,) tensor
    engine = build_model_and_optimizer(model_cfg, cfg, ds_config)
    try:
        assert engine.module.embed_scale.weight.numel() == 0  # partitioned between forwards
        plain = build_plain_model(model_cfg, cfg.seed, {})
        assert plain.embed_scale.weight.item() == pytest.approx(32 ** 0.5)
        tokens = torch.randint(0, 256, (2, 9))
        with torch.no_grad():
            torch.testing.assert_close(engine(tokens), plain(tokens), rtol=1e-5, atol=1e-6)
        no_decay = [p for g, tensors in zip(engine.optimizer.param_groups, engine.optimizer.fp16_groups)
                    if g["weight_decay"] == 0.0 for p in tensors]
        assert any(p is engine.module.embed_scale.weight for p in no_decay)
    finally:
        engine.destroy()
