"""Bad input to both converters: one clear line naming the file/field, exit 2, nothing written."""
import json
import os

import pytest
import torch

from hf_testlib import run_tool, save_tiny


def _fails(tool, tmp_path, *args, expect=()):
    code, _, err = run_tool(tool, *args)
    assert code == 2, err
    line = err.strip()
    assert len(line.splitlines()) == 1, err
    for part in expect:
        assert part in line, line
    leftovers = [n for n in os.listdir(tmp_path) if ".tmp-" in n or n == "out"]
    assert not leftovers, leftovers
    return line


@pytest.fixture()
def plain(tmp_path):
    save_tiny(tmp_path / "plain", norm_position="mix", post_ln_layers=1)
    return tmp_path / "plain"


def test_export_bad_inputs(tmp_path, plain, spm_model):
    out = str(tmp_path / "out")
    # a checkpoint without a model config
    (tmp_path / "noconf").mkdir()
    (tmp_path / "noconf" / "model.safetensors").write_bytes((plain / "model.safetensors").read_bytes())
    _fails("convert_to_hf", tmp_path, "--checkpoint", str(tmp_path / "noconf"), "--output", out,
           expect=("noconf", "no model config", "--config"))
    # an unknown norm position, an unknown field
    for name, change, expect in (("badpos", {"norm_position": "bogus"}, "norm_position"),
                                 ("badfield", {"frobnicate": 1}, "frobnicate")):
        bad = tmp_path / name
        bad.mkdir()
        (bad / "model.safetensors").write_bytes((plain / "model.safetensors").read_bytes())
        cfg = {**json.loads((plain / "config.json").read_text()), **change}
        cfg.pop("post_ln_layers") if name == "badpos" else None
        (bad / "config.json").write_text(json.dumps(cfg))
        _fails("convert_to_hf", tmp_path, "--checkpoint", str(bad), "--output", out,
               expect=(f"{name}/config.json", expect))
    # learnable residual gates (the reference's scale_res_pre_norm): the HF modeling code has none
    save_tiny(tmp_path / "gated", norm_position="pre", residual_gate_layers="all")
    _fails("convert_to_hf", tmp_path, "--checkpoint", str(tmp_path / "gated"), "--output", out,
           expect=("residual_gate_layers", "cannot be exported"))
    # a tokenizer larger than the model's vocabulary (300 pieces, vocab 200)
    save_tiny(tmp_path / "small", vocab_size=200)
    _fails("convert_to_hf", tmp_path, "--checkpoint", str(tmp_path / "small"), "--output", out, "--tokenizer", spm_model,
           expect=("--tokenizer", "300", "200"))
    _fails("convert_to_hf", tmp_path, "--checkpoint", str(plain), "--output", out, "--max-shard-size", "5XB",
           expect=("--max-shard-size", "XB"))
    # no checkpoint at all; a DeepSpeed dir without 'latest'
    _fails("convert_to_hf", tmp_path, "--checkpoint", str(tmp_path / "missing"), "--output", out, expect=("missing",))
    (tmp_path / "ds").mkdir()
    _fails("convert_to_hf", tmp_path, "--checkpoint", str(tmp_path / "ds"), "--output", out, expect=("ds", "latest"))


def test_non_empty_output_needs_overwrite(tmp_path, plain):
    target = tmp_path / "hf"
    target.mkdir()
    (target / "keep.txt").write_text("user data")
    line = _fails("convert_to_hf", tmp_path, "--checkpoint", str(plain), "--output", str(target),
                  expect=(str(target), "--overwrite"))
    assert (target / "keep.txt").read_text() == "user data" and "not empty" in line
    code, _, err = run_tool("convert_to_hf", "--checkpoint", str(plain), "--output", str(target), "--overwrite")
    assert code == 0, err
    assert not (target / "keep.txt").exists() and (target / "config.json").is_file()
    assert [n for n in os.listdir(tmp_path) if ".tmp-" in n or ".old-" in n] == []
    _fails("convert_from_hf", tmp_path, "--hf", str(target), "--output", str(target), expect=("--overwrite",))


def _hf_dir(tmp_path, name, sharded=False):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                         num_attention_heads=4, max_position_embeddings=32))
    model.save_pretrained(str(tmp_path / name), max_shard_size="20KB" if sharded else "5GB")
    return tmp_path / name


def test_import_bad_inputs(tmp_path):
    out = str(tmp_path / "out")
    # not LLaMA-shaped: another model type, another activation
    hf = _hf_dir(tmp_path, "gpt")
    cfg = json.loads((hf / "config.json").read_text())
    (hf / "config.json").write_text(json.dumps({**cfg, "model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    _fails("convert_from_hf", tmp_path, "--hf", str(hf), "--output", out, expect=("gpt/config.json", "model_type"))
    (hf / "config.json").write_text(json.dumps({**cfg, "hidden_act": "gelu"}))
    _fails("convert_from_hf", tmp_path, "--hf", str(hf), "--output", out, expect=("config.json", "hidden_act"))
    (hf / "config.json").write_text(json.dumps({k: v for k, v in cfg.items() if k != "hidden_size"}))
    _fails("convert_from_hf", tmp_path, "--hf", str(hf), "--output", out, expect=("config.json", "hidden_size"))
    # no config at all
    (tmp_path / "empty").mkdir()
    _fails("convert_from_hf", tmp_path, "--hf", str(tmp_path / "empty"), "--output", out, expect=("config.json",))
    # a missing shard, a truncated shard
    hf = _hf_dir(tmp_path, "sharded", sharded=True)
    shards = sorted(n for n in os.listdir(hf) if n.startswith("model-"))
    data = (hf / shards[1]).read_bytes()
    (hf / shards[1]).write_bytes(data[: len(data) // 2])
    _fails("convert_from_hf", tmp_path, "--hf", str(hf), "--output", out, expect=(shards[1], "truncated"))
    (hf / shards[1]).unlink()
    _fails("convert_from_hf", tmp_path, "--hf", str(hf), "--output", out,
           expect=("model.safetensors.index.json", shards[1], "missing"))
    # a tensor of the wrong shape (a config that does not match its weights)
    hf = _hf_dir(tmp_path, "shape")
    (hf / "config.json").write_text(json.dumps({**cfg, "intermediate_size": 64}))
    _fails("convert_from_hf", tmp_path, "--hf", str(hf), "--output", out, expect=("mlp.", "shape"))


def test_two_stream_position_for_a_stock_checkpoint_is_refused(tmp_path):
    """A stock LlamaForCausalLM has one residual stream and no two-stream norms: named flag, one line."""
    hf = _hf_dir(tmp_path, "stock")
    for position in ("siamese", "residual-dual"):
        _fails("convert_from_hf", tmp_path, "--hf", str(hf), "--output", str(tmp_path / "out"),
               "--norm-position", position, expect=(f"--norm-position {position}", "stock one-stream"))


def test_import_conflicting_norm_position(tmp_path):
    save_tiny(tmp_path / "plain", norm_position="mix", post_ln_layers=1)
    assert run_tool("convert_to_hf", "--checkpoint", str(tmp_path / "plain"), "--output", str(tmp_path / "hf"))[0] == 0
    _fails("convert_from_hf", tmp_path, "--hf", str(tmp_path / "hf"), "--output", str(tmp_path / "out"),
           "--norm-position", "pre", expect=("config.json", "norm_positions", "'post,pre*3'", "'pre*4'"))
    _fails("convert_from_hf", tmp_path, "--hf", str(tmp_path / "hf"), "--output", str(tmp_path / "out"),
           "--norm-position", "nonsense", expect=("norm_position", "nonsense"))
    # a config.json whose norm_positions were edited away from the recorded model config
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    (tmp_path / "hf" / "config.json").write_text(json.dumps({**cfg, "norm_positions": ["pre"] * 4}))
    _fails("convert_from_hf", tmp_path, "--hf", str(tmp_path / "hf"), "--output", str(tmp_path / "out"),
           expect=("config.json", "mixln_model_config", "disagrees"))
    (tmp_path / "hf" / "config.json").write_text(json.dumps(cfg))
    # the same positions given explicitly are fine
    code, _, err = run_tool("convert_from_hf", "--hf", str(tmp_path / "hf"), "--output", str(tmp_path / "ok"),
                            "--norm-position", "mix", "--post-ln-layers", "1")
    assert code == 0, err
