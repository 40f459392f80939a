"""Checkpoint layout conversion without processes: split/merge, DeepSpeed file layouts, plain format, CLI.
(The end-to-end save -> convert -> resume with real engines is in test_parallel_deepspeed.py.)"""
import importlib.util
import json
import os

import pytest
import torch

from megatron_mixln.model import build_model
from megatron_mixln.parallel import merge_tp, split_tp, tp_partition_dim
from megatron_mixln.checkpoint.convert import (
    convert, load_plain, read_deepspeed_checkpoint, save_plain, write_deepspeed_checkpoint,
)
from parallel_jobs import tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def full_state_dict(**overrides):
    cfg = tiny_config(norm_position="post,peri,lns,deepnorm", num_layers=4, num_query_groups=2, **overrides)
    torch.manual_seed(0)
    return cfg, {k: v.clone() for k, v in build_model(cfg).state_dict().items()}


def _equal(a, b):
    assert sorted(a) == sorted(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_partition_dims():
    assert tp_partition_dim("layers.3.attn.q_proj.weight") == 0
    assert tp_partition_dim("layers.3.mlp.down_proj.weight") == 1
    assert tp_partition_dim("embed.weight") == 0 and tp_partition_dim("lm_head.weight") == 0
    assert tp_partition_dim("embed_scale.weight") is None  # --learnable-embedding-scale: one replicated scalar
    for k in ("layers.0.attn_norm.weight", "layers.1.attn_out_norm.weight", "final_norm.weight", "final_norm.bias"):
        assert tp_partition_dim(k) is None


def test_linear_bias_partition_dims_split_merge_and_universal_patterns():
    """Column-parallel biases split with their rows; o/down biases replicated (they are added after the TP sum):
    in the split/merge table and in the patterns DeepSpeed's universal checkpoints reshape TP with."""
    import re

    from megatron_mixln.checkpoint.universal import universal_checkpoint_info
    from deepspeed.checkpoint.constants import PARAMETER_WITH_ROW_PARALLELISM_PATTERNS, TP_REPLICATED_PARAMETER_PATTERNS

    assert [tp_partition_dim(f"layers.0.{m}.bias") for m in ("attn.q_proj", "attn.v_proj", "mlp.up_proj")] == [0, 0, 0]
    assert tp_partition_dim("lm_head.bias") == 0
    assert tp_partition_dim("layers.0.attn.o_proj.bias") is None and tp_partition_dim("layers.0.mlp.down_proj.bias") is None
    cfg, sd = full_state_dict(add_bias_linear=True, add_output_layer_bias=True)
    shards = [split_tp(sd, 2, r) for r in range(2)]
    assert shards[1]["layers.0.attn.k_proj.bias"].shape == (8,) and shards[1]["lm_head.bias"].shape == (64,)
    assert torch.equal(shards[1]["layers.0.attn.o_proj.bias"], sd["layers.0.attn.o_proj.bias"])
    _equal(merge_tp(shards), sd)
    info = universal_checkpoint_info(build_model(cfg, device="meta"))
    def matches(key, patterns):
        return any(re.match(p, key) for p in info[patterns])
    assert matches("layers.1.mlp.down_proj.bias", TP_REPLICATED_PARAMETER_PATTERNS)
    assert not matches("layers.1.mlp.down_proj.bias", PARAMETER_WITH_ROW_PARALLELISM_PATTERNS)
    assert matches("layers.1.mlp.down_proj.weight", PARAMETER_WITH_ROW_PARALLELISM_PATTERNS)
    assert not any(matches("layers.1.attn.q_proj.bias", p) for p in (TP_REPLICATED_PARAMETER_PATTERNS,
                                                                     PARAMETER_WITH_ROW_PARALLELISM_PATTERNS))


def test_universal_checkpoints_keep_the_embedding_scale_whole():
    """DeepSpeed's universal checkpoint merges/splits TP slices by the patterns the trainer records: the learnable
    embedding scale is one replicated scalar (the embedding itself is split by vocabulary rows)."""
    import re

    pytest.importorskip("deepspeed")
    from deepspeed.checkpoint.constants import PARAMETER_WITH_ROW_PARALLELISM_PATTERNS, TP_REPLICATED_PARAMETER_PATTERNS

    from megatron_mixln.checkpoint.universal import universal_checkpoint_info

    info = universal_checkpoint_info(build_model(tiny_config(learnable_embedding_scale=True)))
    replicated = info[TP_REPLICATED_PARAMETER_PATTERNS] + info[PARAMETER_WITH_ROW_PARALLELISM_PATTERNS]
    assert any(re.match(p, "embed_scale.weight") for p in info[TP_REPLICATED_PARAMETER_PATTERNS])
    assert not any(re.match(p, "embed.weight") for p in replicated)


def test_split_merge_round_trip_and_replica_check():
    _, sd = full_state_dict()
    shards = [split_tp(sd, 2, r) for r in range(2)]
    assert shards[0]["layers.0.attn.k_proj.weight"].shape == (8, 32)  # 2 kv heads -> 1 per rank
    assert shards[1]["layers.0.attn.o_proj.weight"].shape == (32, 16)
    _equal(merge_tp(shards), sd)
    shards[1]["final_norm.weight"] += 1
    with pytest.raises(ValueError, match="final_norm.weight: replicated parameter differs between TP ranks"):
        merge_tp(shards)


def test_pipeline_layout_files_and_round_trip(tmp_path):
    cfg, sd = full_state_dict(learnable_embedding_scale=True)
    write_deepspeed_checkpoint(sd, str(tmp_path), "step7", tp=2, pp=2, engine="pipeline", config=cfg,
                               metadata={"global_steps": 7, "iteration": 7})
    names = sorted(os.listdir(tmp_path / "step7"))
    assert names == sorted(["converted.json", "manifest.json"] + [f"layer_{i:02d}-model_{r:02d}-model_states.pt" for i in range(6) for r in range(2)]
                           + [f"mp_rank_{r:02d}_model_states.pt" for r in range(4)])
    assert (tmp_path / "latest").read_text() == "step7"
    head = torch.load(tmp_path / "step7" / "layer_05-model_01-model_states.pt", weights_only=True)
    assert sorted(head) == ["final_norm.weight", "lm_head.weight"] and head["lm_head.weight"].shape == (64, 32)
    embedding = torch.load(tmp_path / "step7" / "layer_00-model_01-model_states.pt", weights_only=True)
    assert sorted(embedding) == ["embed.weight", "embed_scale.weight"]  # the first stage owns the scale
    block = torch.load(tmp_path / "step7" / "layer_02-model_00-model_states.pt", weights_only=True)
    assert "attn_out_norm.weight" in block  # layer 2 is the peri block, keys relative to the block
    plain, meta, layout = read_deepspeed_checkpoint(str(tmp_path))
    _equal(plain, sd)
    assert layout == {"engine": "pipeline", "tp": 2, "pp": 2}
    assert meta["global_steps"] == 7 and meta["iteration"] == 7


def test_plain_engine_layout_round_trip(tmp_path):
    cfg, sd = full_state_dict()
    write_deepspeed_checkpoint(sd, str(tmp_path), "t", tp=2, pp=1, engine="plain", config=cfg)
    mp0 = torch.load(tmp_path / "t" / "mp_rank_00_model_states.pt", weights_only=True)
    assert mp0["module"]["layers.0.attn.q_proj.weight"].shape == (16, 32) and mp0["mp_world_size"] == 2
    plain, _, layout = read_deepspeed_checkpoint(str(tmp_path), "t")
    _equal(plain, sd)
    assert layout == {"engine": "plain", "tp": 2, "pp": 1}
    with pytest.raises(ValueError, match="plain DeepSpeed engine has no pipeline stages"):
        write_deepspeed_checkpoint(sd, str(tmp_path / "x"), "t", tp=1, pp=2, engine="plain", config=cfg)
    with pytest.raises(ValueError, match="num_query_groups=2 is not divisible by --tensor-model-parallel-size=4"):
        write_deepspeed_checkpoint(sd, str(tmp_path / "y"), "t", tp=4, pp=1, engine="plain", config=cfg)
    with pytest.raises(ValueError, match="needs the ModelConfig"):
        write_deepspeed_checkpoint(sd, str(tmp_path / "z"), "t", tp=2, pp=1, engine="plain", config=None)


def test_writing_into_a_used_tag_is_refused(tmp_path):
    """A TP2xPP2 conversion and then a TP1 one into the same tag would leave both layouts' files there;
    readers take the layer files, i.e. the first (stale) weights."""
    cfg, sd = full_state_dict()
    write_deepspeed_checkpoint(sd, str(tmp_path), "t", tp=2, pp=2, engine="pipeline", config=cfg)
    other = {k: v + 1 for k, v in sd.items()}
    with pytest.raises(ValueError, match="already exists and is not empty"):
        write_deepspeed_checkpoint(other, str(tmp_path), "t", tp=1, pp=1, engine="plain", config=cfg)
    _equal(read_deepspeed_checkpoint(str(tmp_path), "t")[0], sd)


def test_plain_format_with_config_and_tied_head(tmp_path):
    cfg, sd = full_state_dict(tie_embeddings=True)
    save_plain(sd, str(tmp_path), cfg, {"global_steps": 3})
    plain, cfg2, meta = load_plain(str(tmp_path))
    _equal(plain, sd)
    assert cfg2 == cfg and meta == {"global_steps": 3}
    model = build_model(cfg2)
    model.load_state_dict(plain)
    assert model.lm_head.weight is model.embed.weight


def test_cli_converts_and_reports_bad_layouts(tmp_path):
    spec = importlib.util.spec_from_file_location("convert_checkpoint", os.path.join(ROOT, "tools", "convert_checkpoint.py"))
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    cfg, sd = full_state_dict()
    save_plain(sd, str(tmp_path / "plain"), cfg)
    assert cli.main(["--input", str(tmp_path / "plain"), "--output", str(tmp_path / "ds"), "--to", "deepspeed",
                     "--tp", "2", "--pp", "2", "--out-tag", "s"]) == 0
    assert cli.main(["--input", str(tmp_path / "ds"), "--output", str(tmp_path / "back"), "--to", "plain",
                     "--config", str(tmp_path / "plain" / "config.json")]) == 0
    _equal(load_plain(str(tmp_path / "back"))[0], sd)
    assert json.loads((tmp_path / "ds" / "s" / "converted.json").read_text())["optimizer_states"] is False
    assert json.loads((tmp_path / "back" / "config.json").read_text())["norm_position"] == cfg.norm_position
    assert cli.main(["--input", str(tmp_path / "plain"), "--output", str(tmp_path / "bad"), "--to", "deepspeed",
                     "--tp", "4"]) == 2  # 2 kv heads over 4 TP ranks
    summary = convert(str(tmp_path / "plain"), str(tmp_path / "ds1"), to="deepspeed", tp=1, pp=1)
    assert summary["target"]["engine"] == "plain"


def test_cli_errors_name_what_is_missing(tmp_path, capsys):
    """A missing --input is reported as missing (not as a missing 'latest' file); an existing directory
    with neither format says so and names --tag; a bad --config is one line too."""
    spec = importlib.util.spec_from_file_location("convert_checkpoint", os.path.join(ROOT, "tools", "convert_checkpoint.py"))
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)

    def error(*argv):
        assert cli.main(list(argv)) == 2
        err = capsys.readouterr().err
        assert err.startswith("convert_checkpoint: error: ") and err.count("\n") == 1, err
        return err

    err = error("--input", str(tmp_path / "nowhere"), "--output", str(tmp_path / "out"))
    assert "nowhere: no such directory" in err and "latest" not in err
    (tmp_path / "empty").mkdir()
    err = error("--input", str(tmp_path / "empty"), "--output", str(tmp_path / "out"))
    assert "neither a plain checkpoint (no model.safetensors) nor a DeepSpeed one with a 'latest' file" in err
    assert "--tag" in err
    error("--input", str(tmp_path / "empty"), "--output", str(tmp_path / "out"), "--config", str(tmp_path / "x.json"))
    assert not (tmp_path / "out").exists()


def test_trainer_sidecars_and_nested_model_config_are_carried(tmp_path):
    """The trainer stores its ModelConfig in client_state["mixln"] and a JSON sidecar per tag."""
    cfg, sd = full_state_dict()
    write_deepspeed_checkpoint(sd, str(tmp_path / "src"), "iter_0000003", tp=2, pp=2, engine="pipeline", config=cfg,
                               metadata={"global_steps": 3, "mixln": {"model_config": cfg.to_dict()}})
    (tmp_path / "src" / "iter_0000003" / "mixln_meta.json").write_text('{"tag": "iter_0000003"}')
    convert(str(tmp_path / "src"), str(tmp_path / "plain"), to="plain")  # config found in the client state
    plain, cfg2, meta = load_plain(str(tmp_path / "plain"))
    assert cfg2 == cfg and meta["global_steps"] == 3
    convert(str(tmp_path / "plain"), str(tmp_path / "dst"), to="deepspeed", tp=1, pp=1, out_tag="iter_0000003")
    assert (tmp_path / "dst" / "iter_0000003" / "mixln_meta.json").read_text() == '{"tag": "iter_0000003"}'
    mp0 = torch.load(tmp_path / "dst" / "iter_0000003" / "mp_rank_00_model_states.pt", weights_only=True)
    assert mp0["mixln"]["model_config"] == cfg.to_dict() and mp0["global_steps"] == 3


def test_trainer_resume_layout_check_points_to_the_converter():
    from megatron_mixln.checkpoint.compat import check_resume_layout
    from megatron_mixln.errors import UsageError

    meta = {"tag": "iter_0000003", "data_parallel_size": 1, "zero_stage": 1,
            "tensor_model_parallel_size": 2, "pipeline_model_parallel_size": 2}
    check_resume_layout(meta, "ckpt", 1, 1, 2, 2)
    with pytest.raises(UsageError, match=r"--tensor-model-parallel-size 2 --pipeline-model-parallel-size 2; "
                                         r"this run has 1 and 1\. Convert it first: .*--tp 1 --pp 1"):
        check_resume_layout(meta, "ckpt", 1, 1, 1, 1)
    # converted to TP=1 x PP=1: no optimizer states, so any data-parallel size / ZeRO stage resumes it
    converted = {**meta, "converted": {"tensor_model_parallel_size": 1, "pipeline_model_parallel_size": 1}}
    check_resume_layout(converted, "ckpt", 4, 0, 1, 1)
    with pytest.raises(UsageError, match="Convert it first"):
        check_resume_layout(converted, "ckpt", 1, 1, 2, 1)
