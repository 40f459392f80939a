"""Norm-zoo options under TP=2, TP=2+SP and PP=2 equal one process (see zoo_jobs.py).

The SP-gradient walk: models that between them use every position and option (linear biases included), one step at TP=2+SP,
and every parameter's gradient compared by name with TP=1 (Megatron-LM #1446's bug class: a norm-like
parameter that sees sequence (or head) shards and whose gradient is not summed over TP).
"""
import pytest

from spawn_testlib import run_spawned
from zoo_jobs import ZOO_CASES

TOL = 1e-5


@pytest.fixture(scope="module")
def tp_results():
    from zoo_jobs import tp_zoo_job

    return run_spawned(tp_zoo_job, 2)


@pytest.mark.parametrize("variant", ["tp", "sp"])
@pytest.mark.parametrize("case", list(ZOO_CASES))
def test_every_parameter_gradient_matches_single_process(tp_results, case, variant):
    for rank, res in enumerate(tp_results):
        prefix = f"{case}/{variant}"
        assert res[f"{prefix}/logits"] < TOL and res[f"{prefix}/loss"] < TOL, (rank, prefix)
        bad = {k: v for k, v in res[f"{prefix}/grads"].items() if not v < TOL}
        assert not bad, f"rank {rank} {prefix}: gradients differ from TP=1: {bad}"
    names = tp_results[0][f"{case}/{variant}/grads"]
    if "biases" in case:  # every kind of linear bias was compared
        assert {"layers.0.attn.q_proj.bias", "layers.0.attn.o_proj.bias", "layers.2.mlp.down_proj.bias",
                "lm_head.bias"} <= set(names)
    else:
        assert any("q_norm" in k for k in names) and any(".alpha" in k or "attn.q_norm" in k for k in names)
    assert ("embed_scale.weight" in names) == (case not in ("walk_full_qk_olmo2", "walk_linear_biases_gqa"))


def test_embedding_scale_without_its_sequence_parallel_sum_is_caught(tp_results):
    """Negative control: under SP the scale multiplies this rank's sequence shard of the embedding; without the
    TP sum its gradient is one rank's part, which the walk above would report."""
    for res in tp_results:
        assert res["hybridnorm_star_dyt/sp_unsummed_embed_scale"] > 1e-3


def test_rank_local_full_qk_norm_is_a_different_function(tp_results):
    """Negative control: full QK-norm with statistics of each rank's own heads (no TP sum) differs from TP=1,
    so the equality above depends on the reduction."""
    for res in tp_results:
        assert res["walk_full_qk_olmo2/rank_local_qk/logits"] > 1e-4


@pytest.fixture(scope="module")
def pp_results():
    from zoo_jobs import pp_zoo_job

    return run_spawned(pp_zoo_job, 2)


@pytest.mark.slow
def test_pipeline_and_sequence_parallel_training_match_single_process(pp_results):
    for res in pp_results:
        assert max(abs(a - b) for a, b in zip(res["pp2"], res["ref"])) < TOL, (res["pp2"], res["ref"])
        assert max(abs(a - b) for a, b in zip(res["tp2_sp_full"], res["ref_full"])) < TOL
        assert len(res["pp2"]) == 3 and res["ref"][0] != res["ref"][2]  # it trained
    # each stage builds its blocks with their global layer numbers (LNS's 1/sqrt(l) on the second stage)
    assert sorted(pp_results[0]["pp2_layer_numbers"] + pp_results[1]["pp2_layer_numbers"]) == [1, 2, 3, 4]


@pytest.mark.slow
def test_pipeline_z_loss_trains_and_logs_like_single_process(pp_results):
    """--z-loss-weight under PP: the engine's loss is CE + z-loss of one process; the last stage keeps the
    z-loss terms for the trainer to log apart (the first stage computes no loss)."""
    for rank, res in enumerate(pp_results):
        assert max(abs(a - b) for a, b in zip(res["pp2_z_total"], res["ref_z_total"])) < TOL
        if rank == 1:
            assert max(abs(a - b) for a, b in zip(res["pp2_z_terms"], res["ref_z"])) < TOL
            assert min(res["ref_z"]) > 1e-3  # a visible term
        else:
            assert res["pp2_z_terms"] == [None] * 3
