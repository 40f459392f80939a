"""--compile compiles the per-token loss too (compile_loss): same losses and logit gradients as eager."""
import torch

from megatron_mixln.training.loss import token_losses
from megatron_mixln.training.model_setup import compile_loss


def test_compiled_loss_matches_eager_fp32_and_bf16_logits():
    g = torch.Generator().manual_seed(0)
    compiled = compile_loss(token_losses)
    for dtype in (torch.float32, torch.bfloat16):
        logits = (3 * torch.randn(2, 5, 37, generator=g)).to(dtype)
        labels = torch.randint(0, 37, (2, 5), generator=g)
        a, b = logits.clone().requires_grad_(True), logits.clone().requires_grad_(True)
        la, lb = compiled(a, labels), token_losses(b, labels)
        assert la.dtype == lb.dtype == torch.float32 and la.shape == labels.shape
        torch.testing.assert_close(la, lb, atol=1e-5, rtol=1e-5)
        la.mean().backward()
        lb.mean().backward()
        torch.testing.assert_close(a.grad, b.grad, atol=1e-5, rtol=1e-3)


def test_trainer_with_compile_trains_like_eager(single_rank):
    """--compile (blocks and the loss compiled) through the real trainer: the same loss curve."""
    from training_testlib import run_and_destroy, tiny_datasets, tiny_model, tiny_train

    runs = [run_and_destroy(tiny_model(), tiny_train(compile=c, train_iters=3, eval_iters=0), tiny_datasets())
            for c in (False, True)]
    eager, compiled = ([h["loss"] for h in r["history"]] for r in runs)
    assert len(eager) == len(compiled) == 3
    torch.testing.assert_close(compiled, eager, atol=1e-4, rtol=1e-4)
