"""The norm zoo and Hugging Face (docs/norm-zoo.md): export to stock classes without remote code -- reordered +
full QK-norm -> Olmo2ForCausalLM, pre + head QK-norm -> Qwen3ForCausalLM, lns (and lns/pre lists) ->
LlamaForCausalLM with 1/sqrt(l) folded into the gains, Pre-LN LayerNorm -> StableLmForCausalLM -- with equal fp32 logits and greedy generation; import
of Olmo2/Qwen3/StableLM checkpoints made by transformers itself; every other zoo model through the exported modeling file
(trust_remote_code), and back through the importer."""
import json

import pytest
import torch

from hf_testlib import ROOT, greedy, load_hf, run_tool, save_tiny

STOCK = {  # id: (ModelConfig overrides, the class transformers loads)
    "olmo2": (dict(norm_position="reordered", qk_norm="full", num_query_groups=2), "Olmo2ForCausalLM"),
    "qwen3": (dict(norm_position="pre", qk_norm="head", num_query_groups=2, tie_embeddings=True), "Qwen3ForCausalLM"),
    "lns-pre-list": (dict(norm_position="lns,pre,lns,lns"), "LlamaForCausalLM"),
    # Pre-LN with LayerNorm (and LNS folded into gain and bias): StableLM is sequential Pre-LN LayerNorm + SwiGLU
    "layernorm-pre-lns": (dict(norm_position="pre,lns,lns,pre", normalization="LayerNorm", num_query_groups=2),
                          "StableLmForCausalLM"),
}


def _export_and_compare(tmp_path, overrides, cls):
    """Export a tiny model with these overrides; the loaded HF model (class `cls`) must give our fp32 logits
    and greedy tokens. Returns (our config, our model, the tokens, our logits)."""
    config, model = save_tiny(tmp_path / "plain", **overrides)
    code, out, err = run_tool("convert_to_hf", "--checkpoint", str(tmp_path / "plain"), "--output", str(tmp_path / "hf"))
    assert code == 0, err
    assert json.loads(out)["custom_code"] is (cls == "MixLNLlamaForCausalLM") and json.loads(out)["class"] == cls
    hf = load_hf(tmp_path / "hf")
    assert type(hf).__name__ == cls
    tokens = torch.randint(0, config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, theirs = model(tokens), hf(tokens).logits
    assert (ours - theirs).abs().max().item() <= 1e-5 and ours.abs().max() > 0.1
    generated = hf.generate(tokens[:, :5], max_new_tokens=8, min_new_tokens=8, do_sample=False, use_cache=True)
    assert torch.equal(generated, greedy(model, tokens[:, :5], 8))
    return config, model, tokens, ours


@pytest.mark.parametrize("case", list(STOCK))
def test_export_to_stock_class_matches_our_model(tmp_path, case):
    overrides, cls = STOCK[case]
    _export_and_compare(tmp_path, overrides, cls)
    assert not list((tmp_path / "hf").glob("*.py"))  # no remote code
    assert f"from_pretrained(DIR)  # stock {cls}" in (tmp_path / "hf" / "README.md").read_text()  # the card says which


CUSTOM = {  # zoo models no stock class holds: the exported modeling file (MixLNLlamaForCausalLM)
    "hybridnorm-star-derf-per-head": dict(norm_position="hybridnorm-star", normalization="Derf",
                                          qk_norm_per_head_gain=True, num_query_groups=2),
    "dyt-bias-qk-head-list-embedding-scale": dict(norm_position="pre,reordered,peri,hybrid", normalization="DyT",
                                                  dyt_bias=True, qk_norm="head", hybrid_ffn_residual_after_norm=False,
                                                  learnable_embedding_scale=True),
    # a model a stock class would hold but for the scale (--learnable-embedding-scale with RMSNorm Pre-LN)
    "pre-rmsnorm-embedding-scale": dict(norm_position="pre", learnable_embedding_scale=True),
    "layernorm-full-qk": dict(norm_position="reordered,lns,post,deepnorm", normalization="LayerNorm", qk_norm="full"),
}


@pytest.mark.parametrize("case", list(CUSTOM))
def test_export_to_modeling_file_matches_our_model_and_imports_back(tmp_path, case):
    config, _, tokens, ours = _export_and_compare(tmp_path, CUSTOM[case], "MixLNLlamaForCausalLM")
    code, _, err = run_tool("convert_from_hf", "--hf", str(tmp_path / "hf"), "--output", str(tmp_path / "ckpt"))
    assert code == 0, err
    from test_hf_import import _our_model

    back_config, back = _our_model(tmp_path / "ckpt")
    assert back_config.positions == config.positions and back_config.qk_norm == config.qk_norm
    assert back_config.learnable_embedding_scale == config.learnable_embedding_scale
    with torch.no_grad():
        assert torch.equal(back(tokens), ours)


@pytest.mark.parametrize("family", ["olmo2", "qwen3", "stablelm"])
def test_transformers_checkpoints_import_with_equal_logits(tmp_path, family):
    import transformers

    common = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-6,
                  rope_parameters={"rope_type": "default", "rope_theta": 5000.0})
    if family == "olmo2":
        hf = transformers.Olmo2ForCausalLM(transformers.Olmo2Config(**common))
    elif family == "stablelm":  # Pre-LN LayerNorm with SwiGLU, RoPE on the whole head
        common = {k: v for k, v in common.items() if k != "rms_norm_eps"}
        common["rope_parameters"] = {**common["rope_parameters"], "partial_rotary_factor": 1.0}
        hf = transformers.StableLmForCausalLM(transformers.StableLmConfig(**common, layer_norm_eps=1e-6))
    else:
        hf = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**common, head_dim=8, use_sliding_window=False))
    torch.manual_seed(0)
    with torch.no_grad():
        for n, p in hf.named_parameters():
            p.add_(0.3 * torch.randn_like(p)) if "norm" in n else p.mul_(3.0)
    hf.eval().save_pretrained(str(tmp_path / "hf"))
    code, _, err = run_tool("convert_from_hf", "--hf", str(tmp_path / "hf"), "--output", str(tmp_path / "ckpt"))
    assert code == 0, err
    from test_hf_import import _our_model

    config, model = _our_model(tmp_path / "ckpt")
    assert config.positions == (("reordered",) if family == "olmo2" else ("pre",)) * 3
    assert config.qk_norm == {"olmo2": "full", "qwen3": "head", "stablelm": "none"}[family]
    assert config.normalization == ("LayerNorm" if family == "stablelm" else "RMSNorm")
    tokens = torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert (model(tokens) - hf(tokens).logits).abs().max().item() <= 1e-5


STOCK_WITH_TOKENIZER = {**STOCK, "qwen2-qkv-bias": (dict(norm_position="pre", add_qkv_bias=True), "Qwen2ForCausalLM"),
                        "llama-bias-linear": (dict(norm_position="pre", add_bias_linear=True), "LlamaForCausalLM")}


@pytest.mark.parametrize("case", list(STOCK_WITH_TOKENIZER))
def test_stock_export_tokenizer_gives_the_training_ids(tmp_path, spm_model, case):
    """AutoTokenizer builds its own tokenizer for some stock model types (qwen2, olmo2, stablelm: transformers 5
    ignores tokenizer_config.json's class there). With this project's default sentencepiece model (nmt_nfkc, which
    no tokenizer.json reproduces) such an export must still encode every text to the training ids: the stock class
    is kept only where AutoTokenizer, loading the export as users and lm-eval do, is exact; else the custom
    modeling file, with a note; and --stock refuses."""
    import sentencepiece as spm
    from transformers import AutoTokenizer

    overrides, cls = STOCK_WITH_TOKENIZER[case]
    config, model = save_tiny(tmp_path / "plain", **overrides)
    code, out, err = run_tool("convert_to_hf", "--checkpoint", str(tmp_path / "plain"), "--output",
                              str(tmp_path / "hf"), "--tokenizer", spm_model)
    assert code == 0, err
    info = json.loads(out)
    tok = AutoTokenizer.from_pretrained(tmp_path / "hf", trust_remote_code=info["custom_code"])
    texts = [line for line in (ROOT / "docs" / "norm-zoo.md").read_text().splitlines() if line.strip()][:60]
    texts += ["a  b", "x\ny", "ﬁ ① Ａ", "  lead", "Ünïcödé", "<s> </s>"]
    sp = spm.SentencePieceProcessor(model_file=spm_model)
    assert tok(texts)["input_ids"] == sp.encode(texts)
    if info["custom_code"]:  # fell back: said so, once, and the weights are still ours
        assert "note" in info and f"{cls} holds the weights exactly, but AutoTokenizer" in err, err
        assert info["class"] == "MixLNLlamaForCausalLM"
        code, _, err = run_tool("convert_to_hf", "--checkpoint", str(tmp_path / "plain"), "--output",
                                str(tmp_path / "hf-stock"), "--tokenizer", spm_model, "--stock")
        assert code == 2 and err.strip().endswith("drop --stock (the custom modeling file keeps the tokenizer exact)")
        assert not (tmp_path / "hf-stock").exists()
    else:
        assert info["class"] == cls and "note" not in info
    hf = load_hf(tmp_path / "hf")
    tokens = torch.tensor([sp.encode(texts[0])[:12]])
    with torch.no_grad():
        assert (hf(tokens).logits - model(tokens)).abs().max().item() <= 1e-5
    if case == "olmo2":  # the case a user found: OLMo 2's AutoTokenizer rebuilds the tokenizer without sentencepiece
        assert info["custom_code"]


@pytest.mark.parametrize("overrides, flag", [
    (dict(norm_position="pre", learnable_embedding_scale=True), "--learnable-embedding-scale"),
    (dict(norm_position="pre", qk_norm="head", qk_norm_per_head_gain=True), "--qk-norm-per-head-gain"),
    (dict(norm_position="pre", final_norm=False), "--no-final-norm"),
    (dict(norm_position="pre", normalization="LayerNorm", add_bias_linear=True), "--add-bias-linear"),
])
def test_stock_refusal_names_the_flag_no_stock_class_holds(tmp_path, overrides, flag):
    """A pre RMSNorm model (a stock Llama row) but for one option: --stock names that option."""
    save_tiny(tmp_path / "plain", **overrides)
    code, _, err = run_tool("convert_to_hf", "--checkpoint", str(tmp_path / "plain"), "--output", str(tmp_path / "hf"),
                            "--stock")
    assert code == 2 and err.count("\n") == 1 and f"--stock: {flag}: " in err and "drop --stock" in err, err
    assert not (tmp_path / "hf").exists()
