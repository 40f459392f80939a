"""The norm zoo through the trainer itself (`pretrain`): an OLMo-2-style model (reordered norm, full QK-norm,
z-loss) with HybridNorm* and DyT layers, and biases on every linear and the LM head, trains to the same losses and z-losses on 1 process, TP=2 + SP and PP=2,
and the z-loss is logged apart from the NLL."""
import pytest

from training_testlib import run_spawned, tiny_datasets

MODEL = dict(vocab_size=256, hidden_size=32, ffn_hidden_size=64, num_layers=4, num_attention_heads=4,
             num_query_groups=2, seq_length=16, norm_position="reordered,hybrid-first,lns,reordered", qk_norm="head",
             norm_impl="torch", add_bias_linear=True, add_output_layer_bias=True)
TRAIN = dict(micro_batch_size=2, global_batch_size=4, train_iters=3, lr=1e-2, lr_warmup_iters=0, eval_iters=0,
             log_interval=1, grad_norm_interval=0, seed=7, wandb_mode="disabled", z_loss_weight=1e-2, clip_grad=0.0)


def _job(rank, world_size, tmpdir, tp, sp, pp):
    from megatron_mixln.model import ModelConfig
    from megatron_mixln.training.config import TrainingConfig
    from training_testlib import run_and_destroy

    train = TrainingConfig(**TRAIN, tensor_model_parallel_size=tp, sequence_parallel=sp,
                           pipeline_model_parallel_size=pp)
    return run_and_destroy(ModelConfig(**MODEL), train, tiny_datasets())["history"]


@pytest.mark.slow
def test_zoo_model_trains_alike_on_every_layout():
    ref = run_spawned(_job, 1, 1, False, 1)[0]
    assert len(ref) == 3 and all(r["z_loss"] > 1e-3 for r in ref)  # logged apart, and visible
    for tp, sp, pp in ((2, True, 1), (1, False, 2)):
        for rank, hist in enumerate(run_spawned(_job, 2, tp, sp, pp)):
            for got, want in zip(hist, ref):
                assert abs(got["loss"] - want["loss"]) < 1e-5, (tp, pp, rank, got, want)
                assert abs(got["z_loss"] - want["z_loss"]) < 1e-6, (tp, pp, rank, got, want)
