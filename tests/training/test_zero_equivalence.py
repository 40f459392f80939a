"""ZeRO 0-3 on 2 processes reproduce the single-process fp32 run: losses, gradient norms (global
and per layer), LR and validation perplexity -- and the perplexity equals exp(summed NLL / tokens)
computed directly with the model."""
import json
import math
import os

import pytest
import torch
import torch.nn.functional as F

from training_testlib import run_and_destroy, run_spawned, tiny_datasets, tiny_model, tiny_train

STAGES = (0, 1, 2, 3)
CONFIG = dict(train_iters=4, grad_norm_interval=2, eval_iters=2, eval_interval=2)


def _layer_records(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as fh:
        return [r for r in map(json.loads, fh) if r["kind"] == "grad_norms"]


def _two_rank_job(rank, world_size, tmpdir):
    out = {}
    for stage in STAGES:
        run_dir = os.path.join(tmpdir, f"zero{stage}")
        summary = run_and_destroy(tiny_model(), tiny_train(zero_stage=stage, run_dir=run_dir, **CONFIG), tiny_datasets())
        out[stage] = {"history": summary["history"], "evals": summary["evals"],
                      "gradient_accumulation_steps": summary["gradient_accumulation_steps"],
                      "layers": _layer_records(run_dir) if rank == 0 else []}
    # Stop at step 2 and resume, ZeRO-3: partitioned optimizer states, two data shards.
    save = os.path.join(tmpdir, "ckpt")
    first = run_and_destroy(tiny_model(), tiny_train(zero_stage=3, save=save, exit_interval=2, **CONFIG), tiny_datasets())
    second = run_and_destroy(tiny_model(), tiny_train(zero_stage=3, load=save, **CONFIG), tiny_datasets())
    out["resume"] = {"first": first["history"], "second": second["history"], "stop": first["stop_reason"]}
    return out


@pytest.fixture(scope="module")
def reference(single_rank, tmp_path_factory):
    """The single-process ZeRO-0 run, plus its engine for an independent evaluation."""
    from megatron_mixln.training.trainer import pretrain

    run_dir = str(tmp_path_factory.mktemp("ref"))
    summary = pretrain(tiny_model(), tiny_train(zero_stage=0, run_dir=run_dir, **CONFIG), tiny_datasets())
    yield summary, _layer_records(run_dir)
    summary.engine.destroy()


@pytest.fixture(scope="module")
def two_ranks():
    return run_spawned(_two_rank_job, 2)


def _close(a, b, rel):
    return math.isclose(a, b, rel_tol=rel, abs_tol=0.0)


@pytest.mark.slow
@pytest.mark.parametrize("stage", STAGES)
def test_two_ranks_match_one(reference, two_ranks, stage):
    ref, ref_layers = reference
    assert ref.gradient_accumulation_steps == 2
    for rank_result in two_ranks:
        got = rank_result[stage]
        assert got["gradient_accumulation_steps"] == 1  # same global batch, split over 2 ranks
        assert len(got["history"]) == len(ref.history) == 4
        for a, b in zip(got["history"], ref.history):
            assert _close(a["loss"], b["loss"], 1e-5), (stage, a, b)
            assert _close(a["grad_norm"], b["grad_norm"], 1e-4), (stage, a, b)
            assert a["lr"] == b["lr"] and a["consumed_samples"] == b["consumed_samples"]
        for a, b in zip(got["evals"], ref.evals):
            assert a["valid_tokens"] == b["valid_tokens"] == 2 * 4 * 16
            assert _close(a["valid_ppl"], b["valid_ppl"], 1e-5), (stage, a, b)
    layers = two_ranks[0][stage]["layers"]
    assert [r["step"] for r in layers] == [r["step"] for r in ref_layers] == [2, 4]
    for a, b in zip(layers, ref_layers):
        keys = [k for k in b if k.startswith("grad_norm/")]
        assert len(keys) == 2 * 4 and set(keys) == {k for k in a if k.startswith("grad_norm/")}
        for k in keys:
            # rel 1e-4, plus fp32 noise of the *global* norm (~1) for the small post-LN layer norms
            assert b[k] > 0 and math.isclose(a[k], b[k], rel_tol=1e-4, abs_tol=1e-5), (stage, k, a[k], b[k])


@pytest.mark.slow
def test_two_rank_zero3_resume_continues_the_curve(two_ranks):
    for rank_result in two_ranks:
        full, resumed = rank_result[3]["history"], rank_result["resume"]
        assert resumed["stop"] == "exit_interval"
        assert [h["step"] for h in resumed["first"]] == [1, 2] and [h["step"] for h in resumed["second"]] == [3, 4]
        for a, b in zip(resumed["first"] + resumed["second"], full):
            assert a["lr"] == b["lr"] and a["consumed_samples"] == b["consumed_samples"]
            assert _close(a["loss"], b["loss"], 1e-6), (a, b)
            assert _close(a["grad_norm"], b["grad_norm"], 1e-6), (a, b)


def test_per_layer_norms_sum_to_global_norm(reference):
    """The per-layer norms cover every layer parameter: with the embedding/head/final-norm part they
    make up the global norm (checked loosely: layers alone must not exceed it)."""
    ref, layers = reference
    by_step = {h["step"]: h["grad_norm"] for h in ref.history}
    for rec in layers:
        layer_sq = sum(v**2 for k, v in rec.items() if k.startswith("grad_norm/"))
        assert 0 < math.sqrt(layer_sq) <= by_step[rec["step"]] * (1 + 1e-6)


def test_eval_equals_direct_nll(reference):
    ref, _ = reference
    model = ref.engine.module
    _, valid = tiny_datasets()
    tokens = torch.from_numpy(valid.tokens[: 2 * 4])  # eval_iters x global batch, the first samples
    with torch.no_grad():
        logits = model(tokens[:, :-1])
        nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).double(), tokens[:, 1:].reshape(-1), reduction="sum")
    expected = math.exp(nll.item() / tokens[:, 1:].numel())
    assert _close(ref.evals[-1]["valid_ppl"], expected, 1e-6)
