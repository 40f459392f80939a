"""End to end: `megatron_mixln.pretrain` (its CLI entry, real indexed data) on 2 processes with TP=2 +
sequence parallelism (ZeRO-1) and with PP=2 (ZeRO-1), against the same run at DP=2; then the PP=2
checkpoint converted with the checkpoint converter and resumed at DP=2 (TP=1, PP=1), directly and
through docs/checkpoints.md's round trip with new tags (-> TP=2 x PP=2 -> plain -> TP=1 x PP=1), which the
trainer must load by the tag `latest` names, not the one the carried-over metadata names.

All runs see the same global batches (the sampler depends only on the global batch) and the same
5-step LR schedule; the parallel runs stop (and save) after 3 steps with --exit-interval.
"""
import json
import os

import numpy as np
import pytest

from spawn_testlib import run_spawned

TOL = 1e-5
TRAIN_ITERS, EXIT_AT = 5, 3


def write_token_dataset(prefix, n_docs=60, doc_len=40, vocab=256, seed=0):
    from megatron_mixln.data import IndexedDatasetWriter

    rng = np.random.default_rng(seed)
    with IndexedDatasetWriter(prefix, dtype=np.uint16) as writer:
        for _ in range(n_docs):
            writer.add_document(rng.integers(0, vocab, doc_len))
    return prefix


def cli_args(data_prefix, **extra):
    args = ["--vocab-size", "256", "--hidden-size", "32", "--ffn-hidden-size", "64", "--num-layers", "4",
            "--num-attention-heads", "4", "--num-query-groups", "2", "--seq-length", "16",
            "--norm-position", "post,peri,lns,deepnorm", "--micro-batch-size", "1", "--global-batch-size", "4",
            "--lr", "1e-2", "--lr-warmup-iters", "1", "--eval-iters", "1", "--eval-interval", str(EXIT_AT),
            "--log-interval", "1", "--grad-norm-interval", "1", "--split", "90,10,0",
            "--train-iters", str(TRAIN_ITERS), "--data-path", data_prefix, "--seed", "5", "--wandb-mode", "disabled"]
    for key, value in extra.items():
        flag = "--" + key.replace("_", "-")
        args += [flag] if value is True else [flag, str(value)]
    return args


def read_metrics(run_dir):
    rows = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    with open(os.path.join(run_dir, "config.json")) as f:
        config = json.load(f)
    return {"train": [r["loss"] for r in rows if r["kind"] == "train"],
            "grad_norm": [r["grad_norm"] for r in rows if r["kind"] == "train"],
            "valid": [r["valid_loss"] for r in rows if r["kind"] == "valid"],
            "layer_grad_norms": [{k: v for k, v in r.items() if k.startswith("grad_norm/")}
                                 for r in rows if r["kind"] == "grad_norms"],
            "parameters": config["parameters"]}


LAYOUTS = {
    "tp2_sp": {"tensor_model_parallel_size": 2, "sequence_parallel": True, "zero_stage": 1},
    "pp2": {"pipeline_model_parallel_size": 2, "zero_stage": 1},
}


def pretrain_layouts_job(rank, world_size, tmpdir):
    import torch.distributed as dist

    from megatron_mixln.checkpoint.convert import convert
    from megatron_mixln.training.main import main

    prefix = os.path.join(tmpdir, "data", "tokens")
    if rank == 0:
        os.makedirs(os.path.dirname(prefix))
        write_token_dataset(prefix)
    dist.barrier()
    out = {}

    def run(name, **flags):
        out[f"{name}/exit"] = main(cli_args(prefix, save=os.path.join(tmpdir, name), **flags))
        dist.barrier()
        out[name] = read_metrics(os.path.join(tmpdir, name))

    run("dp2")  # the reference: all 5 steps, data parallel only
    for name, flags in LAYOUTS.items():
        run(name, exit_interval=EXIT_AT, **flags)
    if rank == 0:  # the PP=2 checkpoint (pipeline engine files) -> the plain engine's layout for TP=1, PP=1
        convert(os.path.join(tmpdir, "pp2"), os.path.join(tmpdir, "pp2_as_dp"), to="deepspeed", tp=1, pp=1)
        # the round trip of tools/convert_checkpoint.py, every step under a tag of its own
        convert(os.path.join(tmpdir, "pp2"), os.path.join(tmpdir, "tp2pp2"), to="deepspeed", tp=2, pp=2,
                out_tag="as_tp2pp2")
        convert(os.path.join(tmpdir, "tp2pp2"), os.path.join(tmpdir, "plain"), to="plain")
        convert(os.path.join(tmpdir, "plain"), os.path.join(tmpdir, "round_trip"), to="deepspeed", tp=1, pp=1,
                out_tag="back_at_tp1")
    dist.barrier()
    run("resumed", load=os.path.join(tmpdir, "pp2_as_dp"))
    run("round_trip", load=os.path.join(tmpdir, "round_trip"))
    return out


@pytest.fixture(scope="module")
def results():
    return run_spawned(pretrain_layouts_job, 2)[0]


def _close(got, want):
    assert len(got) == len(want) and max(abs(a - b) for a, b in zip(got, want)) < TOL, (got, want)


@pytest.mark.slow
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_pretrain_parallel_layout_matches_data_parallel(results, layout):
    ref = results["dp2"]
    assert results["dp2/exit"] == 0 and results[f"{layout}/exit"] == 0
    assert len(ref["train"]) == TRAIN_ITERS and len(results[layout]["train"]) == EXIT_AT
    _close(results[layout]["train"], ref["train"][:EXIT_AT])
    _close(results[layout]["valid"], ref["valid"][:1])
    _close(results[layout]["grad_norm"], ref["grad_norm"][:EXIT_AT])  # model-wide, not this rank's shard
    assert results[layout]["parameters"] == ref["parameters"]
    # per-layer norms (the Mix-LN diagnostic): gathered from TP shards, or from pipeline stages
    got, want = results[layout]["layer_grad_norms"], ref["layer_grad_norms"][:EXIT_AT]
    assert len(got) == EXIT_AT and got[0].keys() == want[0].keys() and len(got[0]) >= 4 * 4
    _close([v for row in got for v in row.values()], [row[k] for row in want for k in row])


@pytest.mark.slow
def test_pipeline_checkpoint_converted_and_resumed_without_pipeline(results):
    resumed = results["resumed"]
    assert results["resumed/exit"] == 0 and len(resumed["train"]) == TRAIN_ITERS - EXIT_AT
    # the first resumed step depends only on the converted weights, the data position and the LR;
    # later ones also on Adam's moments, which the conversion restarts from zero
    _close(resumed["train"][:1], results["dp2"]["train"][EXIT_AT:EXIT_AT + 1])
    _close(resumed["grad_norm"][:1], results["dp2"]["grad_norm"][EXIT_AT:EXIT_AT + 1])


@pytest.mark.slow
def test_round_trip_with_other_tags_resumes_from_the_tag_latest_names(results):
    """pp2 -> TP2xPP2 (tag as_tp2pp2) -> plain -> TP1xPP1 (tag back_at_tp1): the carried-over
    mixln_meta.json still says iter_0000003; the trainer loads back_at_tp1 and continues the curve."""
    got = results["round_trip"]
    assert results["round_trip/exit"] == 0 and len(got["train"]) == TRAIN_ITERS - EXIT_AT
    _close(got["train"], results["resumed"]["train"])  # the same weights, counters and data position
    _close(got["train"][:1], results["dp2"]["train"][EXIT_AT:EXIT_AT + 1])
