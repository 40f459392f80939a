"""SiameseNorm / ResiDual with pipeline parallelism: both residual streams cross the stage boundary and
PP=2 x DP=2 and TP=2 x PP=2 (+SP, recompute) train like one process (two_stream_jobs)."""
import pytest

from spawn_testlib import run_spawned
from two_stream_jobs import CASES

TOL = 1e-5


@pytest.fixture(scope="module")
def results():
    from two_stream_jobs import two_stream_pipeline_job

    return run_spawned(two_stream_pipeline_job, 4)


def _close(got, want):
    assert len(got) == len(want) == 3
    assert max(abs(a - b) for a, b in zip(got, want)) < TOL, (got, want)


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_pp2_dp2_and_tp2_pp2_sp_match_single_process(results, case):
    for res in results:
        _close(res[f"{case}/pp2_dp2"], res[f"{case}/pp2_dp2_ref"])
        _close(res[f"{case}/tp2_pp2_sp"], res[f"{case}/tp2_pp2_sp_ref"])


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_first_stage_sends_both_streams(results, case):
    first_stage = [res for res in results if res[f"{case}/stage"] == 0]
    assert first_stage
    for res in first_stage:  # one tensor: (x, y) stacked, each micro-batch 1 x seq 8 x hidden 32
        assert res[f"{case}/payload"] == [(2, 1, 8, 32)]
