"""Activation checkpointing and torch.compile are applied from outside, change no parameter name,
and compute the same thing; weight decay skips norm gains."""
import copy

import torch
import torch.nn.functional as F

from training_testlib import tiny_model

from megatron_mixln.model import build_model
from megatron_mixln.training.model_setup import apply_activation_checkpointing, apply_compile, param_groups


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
