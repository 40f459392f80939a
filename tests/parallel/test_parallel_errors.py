"""Bad layouts fail at start-up with an error that names the offending setting (no processes needed)."""
import types

import pytest
import torch
import torch.nn.functional as F

from megatron_mixln.parallel import (
    ModelParallelUnit, check_deepspeed_config, check_parallel_config, check_parallel_sizes,
    check_pipeline_config, check_tensor_parallel_config, stage_partition, vocab_parallel_cross_entropy,
)
from parallel_jobs import tiny_config


def fake_state(tp=1, pp=1, dp=1):
    return types.SimpleNamespace(tp_size=tp, pp_size=pp, dp_size=dp)


def test_layout_must_divide_world_size():
    with pytest.raises(ValueError, match="does not divide the world size 4"):
        check_parallel_sizes(4, 3, 1)
    with pytest.raises(ValueError, match="does not divide the world size 6"):
        check_parallel_sizes(6, 2, 2)
    with pytest.raises(ValueError, match="--pipeline-model-parallel-size: must be a positive integer"):
        check_parallel_sizes(4, 1, 0)
    assert check_parallel_sizes(8, 2, 2) == 2


@pytest.mark.parametrize("overrides, tp, match", [
    (dict(num_attention_heads=4, num_query_groups=4), 8, "num_attention_heads=4 is not divisible"),
    (dict(num_attention_heads=4, num_query_groups=2), 4, "num_query_groups=2 is not divisible"),
    (dict(vocab_size=129), 2, "vocab_size=129 is not divisible"),
    (dict(ffn_hidden_size=66), 4, "ffn_hidden_size=66 is not divisible"),
])
def test_tensor_parallel_shapes_must_divide(overrides, tp, match):
    with pytest.raises(ValueError, match=match):
        check_tensor_parallel_config(tiny_config(**overrides), tp, False)


def test_sequence_parallel_needs_tensor_parallel():
    with pytest.raises(ValueError, match="--sequence-parallel: needs --tensor-model-parallel-size > 1"):
        check_tensor_parallel_config(tiny_config(), 1, True)
    with pytest.raises(ValueError, match="seq_length=9 is not divisible"):
        check_tensor_parallel_config(tiny_config(seq_length=9), 2, True)


def test_pipeline_stages_need_layers():
    with pytest.raises(ValueError, match="num_layers=2 < --pipeline-model-parallel-size=4"):
        check_pipeline_config(tiny_config(num_layers=2), 4, "parameters")
    with pytest.raises(ValueError, match="num_layers=3 is not divisible by --pipeline-model-parallel-size=2"):
        check_pipeline_config(tiny_config(num_layers=3), 2, "uniform")
    # a huge embedding makes parameter balancing give a stage nothing but the embedding
    with pytest.raises(ValueError, match="leaves stage 0 without a transformer layer"):
        stage_partition(tiny_config(num_layers=3, vocab_size=8192), 3, "parameters")
    with pytest.raises(ValueError, match="partition_method: unknown 'type:Block'"):
        check_pipeline_config(tiny_config(), 2, "type:Block")
    assert stage_partition(tiny_config(num_layers=4), 2, "uniform") == [0, 3, 6]


def test_tied_embeddings_with_pipeline_is_refused():
    with pytest.raises(ValueError, match="--tie-embeddings with --pipeline-model-parallel-size > 1"):
        check_pipeline_config(tiny_config(tie_embeddings=True), 2, "parameters")
    check_pipeline_config(tiny_config(tie_embeddings=True), 1, "parameters")  # fine without PP


def test_tensor_parallel_refuses_zero3_partitioned_weights_and_pipeline_modules():
    from megatron_mixln.model import build_model
    from megatron_mixln.parallel import apply_tensor_parallel

    model = build_model(tiny_config())
    model.embed.weight.ds_id = 0  # what deepspeed.zero.Init leaves on every parameter
    with pytest.raises(NotImplementedError, match="--zero-stage 3"):
        apply_tensor_parallel(model, fake_state(tp=2), False)
    with pytest.raises(TypeError, match="build_pipeline_module applies tensor parallelism itself"):
        apply_tensor_parallel(types.SimpleNamespace(forward_funcs=[]), fake_state(tp=2), False)


def test_zero2_and_zero3_refused_with_pipeline():
    for stage in (2, 3):
        with pytest.raises(ValueError, match=f"--zero-stage={stage} cannot be combined with --pipeline-model-parallel-size=2"):
            check_deepspeed_config({"zero_optimization": {"stage": stage}}, fake_state(pp=2), False)
    assert check_deepspeed_config({"zero_optimization": {"stage": 1}}, fake_state(pp=2), False) == {"zero_optimization": {"stage": 1}}
    assert check_deepspeed_config({"zero_optimization": {"stage": 3}}, fake_state(tp=2), False)["zero_optimization"]["stage"] == 3


def test_check_parallel_config_runs_every_check():
    assert check_parallel_config(tiny_config(num_layers=4), 8, 2, 2, sequence_parallel=True) == 2
    with pytest.raises(ValueError, match="vocab_size=129"):
        check_parallel_config(tiny_config(vocab_size=129), 4, 2, 1)


def test_mpu_exposes_megatron_groups_and_no_ulysses_sequence_parallel():
    state = types.SimpleNamespace(tp_size=2, pp_size=2, dp_size=2, tp_rank=1, pp_rank=1, dp_rank=0,
                                  tp_group="tp", pp_group="pp", dp_group="dp", model_parallel_group="mp",
                                  tp_ranks=(4, 5), dp_ranks=(5, 7), model_parallel_rank=3)
    mpu = ModelParallelUnit(state)
    assert mpu.get_data_parallel_group() == "dp" and mpu.get_data_parallel_world_size() == 2
    assert mpu.get_tensor_model_parallel_group() == "tp" and mpu.get_tensor_model_parallel_src_rank() == 4
    assert mpu.get_model_parallel_world_size() == 4 and mpu.get_model_parallel_rank() == 3
    assert mpu.get_pipe_parallel_world_size() == 2 and mpu.get_slice_parallel_rank() == 1
    # DeepSpeed reads these as Ulysses sequence parallelism and would fold them into its DP group
    assert not hasattr(mpu, "get_sequence_parallel_world_size") and not hasattr(mpu, "initialize_sequence_parallel")


def test_vocab_parallel_cross_entropy_single_rank_equals_torch():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 11, requires_grad=True)
    labels = torch.randint(0, 11, (2, 5))
    ours = vocab_parallel_cross_entropy(logits, labels, group=None)
    ref = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="none").view(2, 5)
    torch.testing.assert_close(ours, ref)
    (g1,) = torch.autograd.grad((ours * torch.arange(10.0).view(2, 5)).sum(), logits)
    (g2,) = torch.autograd.grad((ref * torch.arange(10.0).view(2, 5)).sum(), logits)
    torch.testing.assert_close(g1, g2)
