"""Divergence verdicts, seed aggregates and the report's marking of diverged runs, on hand-made metrics."""
import math

from megatron_mixln.research.collect import aggregate, coefficient_of_variation, divergence_verdict, layer_profile
from megatron_mixln.research.report import diverged_cell, ppl_cell


def _m(losses, valid=None, events=()):
    return {"train": [{"step": 10 * (i + 1), "loss": l} for i, l in enumerate(losses)],
            "valid": [{"step": 10 * len(losses), "valid_loss": valid}] if valid is not None else [],
            "grad_norms": [], "events": list(events)}


def test_divergence_verdicts():
    assert divergence_verdict(_m([6.0, 5.0, 4.0, 3.5], 3.6), 0, 1.5) == (None, None)
    # A spike that comes back is not a divergence...
    assert divergence_verdict(_m([6.0, 4.0, 9.0, 3.9], 3.9), 0, 1.5) == (None, None)
    # ...a loss that stays above 1.5 x its best is, from its first step above.
    step, reason = divergence_verdict(_m([6.0, 4.0, 3.0, 7.0, 7.2, 7.1], 7.1), 0, 1.5)
    assert step == 40 and "above 1.5 x its best (3.000)" in reason
    assert divergence_verdict(_m([6.0, 4.0, float("nan")], float("nan")), 0, 1.5)[0] == 30
    assert divergence_verdict(_m([6.0, 5.0], 5.0, [{"step": 17, "event": "diverged"}]), 3, 1.5)[0] == 17


def test_aggregate_and_report_cells():
    def run(seed, ppl, diverged_at=None):
        return {"setting": "post", "position": "post", "fraction": None, "post_ln_layers": None, "positions": "post*2",
                "seed": seed, "state": "diverged" if diverged_at else "finished", "valid_ppl": ppl,
                "diverged": diverged_at is not None, "diverged_at": diverged_at, "tokens_trained": 100,
                "grad_norm_cv": 0.5}

    (row,) = aggregate([run(1, 30.0), run(2, 1409.1, diverged_at=250), run(3, 34.0)])
    assert row["ppl_mean"] == 32.0 and math.isclose(row["ppl_std"], math.sqrt(8.0))
    assert ppl_cell(row) == "32.000 ± 2.828" and diverged_cell(row) == "seed 2 at step 250"


def test_layer_profile_and_cv():
    rec = {"grad_norm/layer_01/attn": 3.0, "grad_norm/layer_01/mlp": 4.0, "grad_norm/layer_02/attn": 1.0,
           "step": 5, "kind": "grad_norms"}
    assert layer_profile(rec) == [5.0, 1.0]
    assert math.isclose(coefficient_of_variation([5.0, 1.0]), 2.0 / 3.0)
