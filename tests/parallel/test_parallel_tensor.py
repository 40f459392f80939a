"""TP=2 (with and without sequence parallelism) against TP=1, for every norm position.

One 2-process job computes everything (see parallel_jobs.tp_equivalence_job); the tests below assert
on its numbers for both ranks.
"""
import pytest

from parallel_jobs import TP_CASES, tiny_config
from spawn_testlib import run_spawned

TOL = 1e-5
VARIANTS = ("tp", "sp", "sp_manual")


@pytest.fixture(scope="module")
def results():
    from parallel_jobs import tp_equivalence_job

    return run_spawned(tp_equivalence_job, 2)


def _expected_norm_params(case):
    cfg = tiny_config(**TP_CASES[case])
    per_norm = 2 if cfg.normalization == "LayerNorm" else 1
    # siamese post_pre: x, y and input norm per sublayer; hybrid_pre: no x or input norm before attention
    per_layer = {"peri": 4, "siamese": 4 if cfg.siamese_variant == "hybrid_pre" else 6}
    final = {"siamese": 3}  # N_f(N_fx(x) + N_fy(y))
    norms = sum(per_layer.get(p, 2) for p in cfg.positions) + (final.get(cfg.positions[0], 1) if cfg.final_norm else 0)
    return norms * per_norm


@pytest.mark.slow
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("case", list(TP_CASES))
def test_tp_matches_single_process(results, case, variant):
    for rank, res in enumerate(results):
        prefix = f"{case}/{variant}"
        for what in ("logits", "loss", "grads", "norm_grads", "params", "layer_grad_norms", "grad_norm"):
            assert res[f"{prefix}/{what}"] < TOL, f"rank {rank} {prefix}: {what} differs by {res[f'{prefix}/{what}']}"
        assert res[f"{prefix}/num_norm_grads"] == _expected_norm_params(case)  # every norm was compared
        assert res[f"{prefix}/num_parameters"] == 0  # the whole model's count, from shards
        assert res[f"{prefix}/logit_shard_width"] == tiny_config(**TP_CASES[case]).vocab_size // 2


@pytest.mark.slow
@pytest.mark.parametrize("case", list(TP_CASES))
def test_sequence_parallel_without_the_tp_sum_is_wrong(results, case):
    """Negative control: with SP and no TP all-reduce of the norm gradients, they are measurably
    wrong (so the comparisons above would catch a missing sum), while everything else still matches."""
    for res in results:
        assert res[f"{case}/sp_unsynced/norm_grads"] > 1e-4
        assert res[f"{case}/sp_unsynced/loss"] < TOL
