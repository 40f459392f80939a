"""Linear biases and Hugging Face: --add-bias-linear exports to stock LlamaForCausalLM (attention_bias, mlp_bias),
--add-qkv-bias to Qwen2ForCausalLM, an LM-head bias (--add-output-layer-bias) only through the exported modeling
file (--stock refused; there HF's attention_bias needs a zero o_proj bias); Llama checkpoints with
attention_bias/mlp_bias and Qwen2 checkpoints made by transformers itself import with equal logits."""
import json
import os

import pytest
import torch
from safetensors.torch import load_file

from hf_testlib import run_tool
from test_hf_import import _our_model
from test_hf_zoo import _export_and_compare

CASES = {  # id: (ModelConfig overrides, class, HF attention_bias, mlp_bias (None: the class has no such field))
    "every-linear-lns": (dict(norm_position="pre,lns,lns,pre", add_bias_linear=True, num_query_groups=2),
                         "LlamaForCausalLM", True, True),
    "qkv-only-qwen2": (dict(norm_position="lns,pre", num_layers=2, add_qkv_bias=True), "Qwen2ForCausalLM", None, None),
    "qkv-only-custom-head-bias": (dict(norm_position="post,pre", num_layers=2, add_qkv_bias=True,
                                       add_output_layer_bias=True), "MixLNLlamaForCausalLM", True, False),
    "head-bias-mix": (dict(norm_position="mix", add_bias_linear=True, add_output_layer_bias=True),
                      "MixLNLlamaForCausalLM", True, True),
}


@pytest.mark.parametrize("case", list(CASES))
def test_export_with_biases_matches_and_imports_back(tmp_path, case):
    overrides, cls, attention_bias, mlp_bias = CASES[case]
    config, _, tokens, ours = _export_and_compare(tmp_path, overrides, cls)
    hf_cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert (hf_cfg.get("attention_bias"), hf_cfg.get("mlp_bias")) == (attention_bias, mlp_bias)
    tensors = load_file(str(tmp_path / "hf" / "model.safetensors"))
    o_bias = tensors.get("model.layers.0.self_attn.o_proj.bias")
    assert (o_bias is None) is (cls == "Qwen2ForCausalLM")  # Qwen2: q/k/v biases only
    if case.startswith("qkv-only-custom"):  # HF's attention_bias biases o_proj too: exported as exact zeros
        assert not o_bias.any()
    assert ("lm_head.bias" in tensors) is config.add_output_layer_bias
    code, _, err = run_tool("convert_from_hf", "--hf", str(tmp_path / "hf"), "--output", str(tmp_path / "ckpt"))
    assert code == 0, err
    back_config, back = _our_model(tmp_path / "ckpt")
    flags = ("add_qkv_bias", "add_bias_linear", "add_output_layer_bias")
    assert [getattr(back_config, f) for f in flags] == [getattr(config, f) for f in flags]
    with torch.no_grad():
        assert (back(tokens) - ours).abs().max() <= 1e-5  # lns: 1/sqrt(l) was folded into the gains


def test_a_trained_o_proj_bias_of_a_qkv_bias_export_imports_exactly(tmp_path):
    """The custom export of a --add-qkv-bias model carries HF's attention_bias, so o_proj has a (zero) bias that
    transformers trains: after fine-tuning, the import holds it with --add-bias-linear (it was refused)."""
    from safetensors.torch import save_file

    overrides, cls, _, _ = CASES["qkv-only-custom-head-bias"]
    _export_and_compare(tmp_path, overrides, cls)
    tensors = load_file(str(tmp_path / "hf" / "model.safetensors"))
    for key in [k for k in tensors if k.endswith("o_proj.bias")]:  # what a fine-tuning step does to it
        tensors[key] = 0.1 * torch.randn_like(tensors[key])
    save_file(tensors, str(tmp_path / "hf" / "model.safetensors"), metadata={"format": "pt"})
    code, _, err = run_tool("convert_from_hf", "--hf", str(tmp_path / "hf"), "--output", str(tmp_path / "ckpt"))
    assert code == 0, err
    back_config, back = _our_model(tmp_path / "ckpt")
    assert back_config.add_qkv_bias and back_config.add_bias_linear and back_config.add_output_layer_bias
    from hf_testlib import load_hf

    tokens = torch.randint(0, back_config.vocab_size, (2, 10), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert (back(tokens) - load_hf(tmp_path / "hf")(tokens).logits).abs().max() <= 1e-5


def test_stock_request_for_a_head_bias_is_refused_in_one_line(tmp_path):
    from hf_testlib import save_tiny

    save_tiny(tmp_path / "plain", add_output_layer_bias=True)
    code, _, err = run_tool("convert_to_hf", "--checkpoint", str(tmp_path / "plain"), "--output", str(tmp_path / "hf"),
                            "--stock")
    assert code == 2 and err.count("\n") == 1 and "--stock" in err and "--add-output-layer-bias" in err, err
    assert not os.path.exists(tmp_path / "hf")


SHAPE = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-6,
             rope_parameters={"rope_type": "default", "rope_theta": 5000.0})


def _import(tmp_path, hf_class, hf_config):
    """A transformers model with random biases and norms, saved and imported: (hf model, our config, our model,
    tokens, the HF logits); our logits must equal them."""
    torch.manual_seed(0)
    hf = hf_class(hf_config)
    with torch.no_grad():
        for n, p in hf.named_parameters():
            p.add_(0.3 * torch.randn_like(p)) if n.endswith("bias") or "norm" in n else p.mul_(3.0)
    hf.eval().save_pretrained(str(tmp_path / "hf"))
    code, _, err = run_tool("convert_from_hf", "--hf", str(tmp_path / "hf"), "--output", str(tmp_path / "ckpt"))
    assert code == 0, err
    config, model = _our_model(tmp_path / "ckpt")
    tokens = torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = hf(tokens).logits
        assert (model(tokens) - ref).abs().max().item() <= 1e-5
    return hf, config, tokens, ref


def test_transformers_qwen2_imports_with_equal_logits(tmp_path):
    import transformers

    _, config, _, _ = _import(tmp_path, transformers.Qwen2ForCausalLM, transformers.Qwen2Config(**SHAPE))
    assert config.add_qkv_bias and not config.add_bias_linear and config.positions == ("pre", "pre")


@pytest.mark.parametrize("attention_bias, mlp_bias", [(True, True), (True, False), (False, True)])
def test_transformers_llama_with_biases_imports_with_equal_logits(tmp_path, attention_bias, mlp_bias):
    import transformers

    hf_config = transformers.LlamaConfig(**SHAPE, attention_bias=attention_bias, mlp_bias=mlp_bias)
    hf, config, tokens, ref = _import(tmp_path, transformers.LlamaForCausalLM, hf_config)
    assert config.add_bias_linear and not config.add_output_layer_bias
    with torch.no_grad():  # the biases matter: the same model without one gives other logits
        layer = hf.model.layers[0]
        (layer.self_attn.q_proj if attention_bias else layer.mlp.up_proj).bias.zero_()
        assert (hf(tokens).logits - ref).abs().max().item() > 1e-3
