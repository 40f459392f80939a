"""tools/compare_norms.py runs a 3-variant norm-zoo sweep (OLMo 2's recipe, HybridNorm*, DyT-pre) end to end on
CPU-sized data, and every run trained the variant it names; the zoo configs parse."""
import json
import os

import pytest

from test_compare_norms import _data, _flags, tool

from megatron_mixln.research.sweep import SweepError, build_sweep


def test_three_variant_zoo_sweep(tmp_path):
    data = _data(tmp_path)
    out = str(tmp_path / "out")
    rc = tool.main(["--positions", "olmo2-recipe,hybridnorm-star,dyt-pre", "--seeds", "1", "--out", out,
                    "--parallel", "2", "--skip-layer-analysis", *_flags(data, train_iters=4, eval_interval=4, save_interval=4)])
    assert rc == 0
    for name in ("olmo2-recipe-s1", "hybridnorm-star-s1", "dyt-pre-s1"):
        rows = [json.loads(l) for l in open(os.path.join(out, "runs", name, "metrics.jsonl"))]
        train = [r for r in rows if r.get("kind") == "train"]
        assert train and all(r["loss"] == r["loss"] for r in train), name  # finite losses were logged
        assert ("z_loss" in train[-1]) == (name == "olmo2-recipe-s1")  # the z-loss is logged apart, only there
        with open(os.path.join(out, "runs", name, "config.json")) as fh:
            model = json.load(fh)["model"]
        assert model["learnable_embedding_scale"] == (name == "dyt-pre-s1")  # DyT's code default: its embedding scale


def test_zoo_flags_are_owned_by_the_variants_and_configs_parse():
    with pytest.raises(SweepError, match="^--qk-norm: set per run by the zoo variant"):
        build_sweep("pre,olmo2-recipe", None, "1", None, ["--qk-norm", "head"], "/tmp/x")
    from megatron_mixln.training.arguments import load_config_file

    for size in ("71m", "130m"):
        values = load_config_file(os.path.join(os.path.dirname(tool.__file__), "..", "configs", "zoo", f"{size}.yaml"))
        assert values["preset"] == size and "norm_position" not in values
