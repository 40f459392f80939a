"""tools/convert_to_hf.py: the export equals this stack's model for every norm position (logits, greedy
generation with the KV cache), and supports what transformers users rely on."""
import json
import subprocess
import sys

import pytest
import torch

from hf_testlib import greedy, hf_env, load_hf, run_tool, save_tiny

CASES = {  # id: (ModelConfig overrides, stock LlamaForCausalLM expected)
    "pre": (dict(norm_position="pre"), True),
    "post": (dict(norm_position="post"), False),
    "peri": (dict(norm_position="peri"), False),
    "lns": (dict(norm_position="lns"), True),  # 1/sqrt(l) folded into the gains: stock Llama
    "deepnorm": (dict(norm_position="deepnorm"), False),
    "deeppost": (dict(norm_position="deeppost"), False),
    "mix": (dict(norm_position="mix", post_ln_layers=1), False),
    "list": (dict(norm_position="post,peri,lns,pre"), False),
    "layernorm": (dict(norm_position="post,lns,deepnorm,peri", normalization="LayerNorm"), False),
    "gqa-tied-mix": (dict(norm_position="mix", post_ln_layers=2, num_query_groups=2, tie_embeddings=True), False),
    "gqa-tied-pre": (dict(norm_position="pre", num_query_groups=1, tie_embeddings=True), True),
    "pre-no-final-norm": (dict(norm_position="pre", final_norm=False), False),
    "pre-layernorm": (dict(norm_position="pre", normalization="LayerNorm"), True),  # StableLmForCausalLM
    "siamese": (dict(norm_position="siamese"), False),
    "siamese-hybrid_pre-layernorm": (dict(norm_position="siamese", siamese_variant="hybrid_pre", normalization="LayerNorm"), False),
    "residual-dual-layernorm-gqa": (dict(norm_position="residual-dual", normalization="LayerNorm", num_query_groups=2), False),
}


@pytest.mark.parametrize("case", list(CASES))
def test_export_matches_our_model(tmp_path, case):
    overrides, stock = CASES[case]
    config, model = save_tiny(tmp_path / "plain", **overrides)
    code, out, err = run_tool("convert_to_hf", "--checkpoint", str(tmp_path / "plain"), "--output", str(tmp_path / "hf"))
    assert code == 0, err
    hf = load_hf(tmp_path / "hf")
    stock_name = "StableLmForCausalLM" if overrides.get("normalization") == "LayerNorm" else "LlamaForCausalLM"
    assert type(hf).__name__ == (stock_name if stock else "MixLNLlamaForCausalLM")
    assert json.loads(out)["custom_code"] is (not stock)
    tokens = torch.randint(0, config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, theirs = model(tokens), hf(tokens).logits
    assert (ours - theirs).abs().max().item() <= 1e-5
    assert ours.abs().max() > 0.1  # not a degenerate comparison
    generated = hf.generate(tokens[:, :5], max_new_tokens=8, min_new_tokens=8, do_sample=False, use_cache=True)
    assert torch.equal(generated, greedy(model, tokens[:, :5], 8))


@pytest.mark.parametrize("positions", ["mix", "post,lns,deepnorm,peri"])
def test_bf16_export_is_within_bf16_rounding(tmp_path, positions):
    config, model = save_tiny(tmp_path / "plain", norm_position=positions, post_ln_layers=1 if positions == "mix" else None,
                              normalization="LayerNorm" if "," in positions else "RMSNorm")
    code, _, err = run_tool("convert_to_hf", "--checkpoint", str(tmp_path / "plain"), "--output", str(tmp_path / "hf"),
                            "--dtype", "bf16")
    assert code == 0, err
    hf = load_hf(tmp_path / "hf", dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in hf.parameters())
    tokens = torch.randint(0, config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        exact = model(tokens).double()
        ours_bf16 = model.to(torch.bfloat16)(tokens).double()
        theirs = hf(tokens).logits.double()
    own_rounding = (ours_bf16 - exact).abs().max().item()  # what bf16 costs this stack's own model
    assert 0 < (theirs - exact).abs().max().item() <= 2 * own_rounding
    # and the bf16 weights are the fp32 ones rounded
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "hf" / "model.safetensors"))
    assert torch.equal(saved["model.embed_tokens.weight"], model.embed.weight.detach())


def test_left_padding_hidden_states_and_gradient_checkpointing(tmp_path):
    from megatron_mixln.diagnostics.layer_analysis import hidden_states

    config, model = save_tiny(tmp_path / "plain", norm_position="mix", post_ln_layers=2, num_query_groups=2)
    assert run_tool("convert_to_hf", "--checkpoint", str(tmp_path / "plain"), "--output", str(tmp_path / "hf"))[0] == 0
    hf = load_hf(tmp_path / "hf")
    g = torch.Generator().manual_seed(3)
    short, long = torch.randint(4, config.vocab_size, (1, 4), generator=g), torch.randint(4, config.vocab_size, (1, 7), generator=g)
    # left padding: the short prompt padded with 3 pad tokens (id 0), masked out
    batch = torch.cat([torch.cat([torch.zeros(1, 3, dtype=torch.long), short], 1), long])
    mask = torch.tensor([[0, 0, 0, 1, 1, 1, 1], [1] * 7])
    out = hf.generate(batch, attention_mask=mask, max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(out[0, 3:], greedy(model, short, 6)[0])
    assert torch.equal(out[1], greedy(model, long, 6)[0])
    # output_hidden_states: the embedding, the outputs of layers 1..L-1, and the final-normed last layer
    tokens = torch.randint(0, config.vocab_size, (2, 9), generator=g)
    with torch.no_grad():
        states = hf(tokens, output_hidden_states=True).hidden_states
        ours = hidden_states(model, tokens)
    assert len(states) == config.num_layers + 1
    for i in range(config.num_layers):
        assert (states[i] - ours[i]).abs().max() <= 1e-5
    assert (states[-1] - model.final_norm(ours[-1])).abs().max() <= 1e-5
    # gradient checkpointing: same loss and gradients as without
    hf.train()
    loss = hf(tokens, labels=tokens).loss
    loss.backward()
    plain_grads = {n: p.grad.clone() for n, p in hf.named_parameters()}
    hf.zero_grad()
    hf.activation_checkpointing_enable()  # transformers 5's name for gradient_checkpointing_enable
    assert hf.is_activation_checkpointing
    loss2 = hf(tokens, labels=tokens).loss
    loss2.backward()
    assert torch.equal(loss, loss2)
    for n, p in hf.named_parameters():
        assert torch.allclose(p.grad, plain_grads[n], atol=1e-6), n


def test_config_tokenizer_card_and_shards(tmp_path, spm_model):
    import sentencepiece as spm
    from transformers import AutoConfig, AutoTokenizer

    config, model = save_tiny(tmp_path / "plain", norm_position="mix", post_ln_layers=1, num_layers=4)
    code, out, err = run_tool("convert_to_hf", "--checkpoint", str(tmp_path / "plain"), "--output", str(tmp_path / "hf"),
                              "--tokenizer", spm_model, "--max-shard-size", "40KB")
    assert code == 0, err
    hf_dir = tmp_path / "hf"
    raw = json.loads((hf_dir / "config.json").read_text())
    assert raw["model_type"] == "mixln_llama" and raw["auto_map"]["AutoModelForCausalLM"].startswith("modeling_mixln_llama")
    assert raw["norm_positions"] == ["post", "pre", "pre", "pre"]
    assert raw["residual_scales"] == [1.0] * 4 and raw["output_scales"] == [1.0] * 4
    assert raw["normalization"] == "RMSNorm" and raw["final_norm"] is True
    assert raw["vocab_size"] == 320 and raw["real_vocab_size"] == 300
    assert raw["mixln_model_config"] == config.to_dict()
    assert raw["rope_parameters"]["rope_theta"] == 10000.0 and raw["max_position_embeddings"] == 64
    cfg = AutoConfig.from_pretrained(str(hf_dir), trust_remote_code=True)
    assert cfg.norm_positions == raw["norm_positions"] and cfg.num_key_value_heads == 4
    index = json.loads((hf_dir / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    # the tokenizer: sentencepiece's ids and special ids
    sp = spm.SentencePieceProcessor(model_file=spm_model)
    tok = AutoTokenizer.from_pretrained(str(hf_dir), trust_remote_code=True)
    text = "Pretraining with the norm position of every layer"
    assert tok(text).input_ids == sp.encode(text)
    # bos is the end-of-document id the training documents followed (sentencepiece's bos 3 was never trained)
    assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id, tok.bos_token_id) == (0, 1, 2, 1)
    assert raw["bos_token_id"] == raw["eos_token_id"] == 1
    assert (hf_dir / "tokenizer.model").read_bytes() == open(spm_model, "rb").read()
    card = (hf_dir / "README.md").read_text()
    assert "`post,pre*3`" in card and "trust_remote_code=True" in card
    # sentencepiece itself serves an nmt_nfkc model (tests/hf/test_hf_tokenizer_export.py tests every kind)
    assert type(tok).__name__ == "SentencePieceBackend" and tok.split_special_tokens


def test_modeling_code_needs_nothing_from_this_package(tmp_path):
    """Loaded in a fresh interpreter where importing megatron_mixln fails, the export still works."""
    config, model = save_tiny(tmp_path / "plain", norm_position="post,peri,lns,deeppost", normalization="LayerNorm")
    assert run_tool("convert_to_hf", "--checkpoint", str(tmp_path / "plain"), "--output", str(tmp_path / "hf"))[0] == 0
    tokens = torch.randint(0, config.vocab_size, (1, 6), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        expected = model(tokens)
    torch.save({"tokens": tokens, "logits": expected}, tmp_path / "io.pt")
    script = f"""
import sys, importlib.abc
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split('.')[0] == 'megatron_mixln':
            raise ImportError('blocked: ' + name)
sys.meta_path.insert(0, Block())
import torch
from transformers import AutoModelForCausalLM
io = torch.load({str(tmp_path / 'io.pt')!r}, weights_only=True)
m = AutoModelForCausalLM.from_pretrained({str(tmp_path / 'hf')!r}, trust_remote_code=True).eval()
with torch.no_grad():
    d = (m(io['tokens']).logits - io['logits']).abs().max().item()
assert 'megatron_mixln' not in sys.modules
print('maxdiff', d)
"""
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=hf_env(),
                       cwd=str(tmp_path))
    assert r.returncode == 0, r.stderr
    assert float(r.stdout.split("maxdiff")[1]) <= 1e-5


def test_export_from_deepspeed_layouts_equals_plain(tmp_path):
    """A TP=2 x PP=2 pipeline checkpoint and a TP=2 plain-engine checkpoint export to the same tensors."""
    from safetensors.torch import load_file

    from megatron_mixln.checkpoint.convert import write_deepspeed_checkpoint

    config, model = save_tiny(tmp_path / "plain", norm_position="mix", post_ln_layers=1, num_query_groups=2)
    meta = {"mixln": {"model_config": config.to_dict()}}  # what the trainer's client state records
    write_deepspeed_checkpoint(model.state_dict(), str(tmp_path / "tp2pp2"), "iter_0000005", 2, 2, "pipeline", meta, config)
    write_deepspeed_checkpoint(model.state_dict(), str(tmp_path / "tp2"), "iter_0000005", 2, 1, "plain", meta, config)
    ref = None
    for src in ("plain", "tp2pp2", "tp2"):
        code, _, err = run_tool("convert_to_hf", "--checkpoint", str(tmp_path / src), "--output", str(tmp_path / f"hf-{src}"))
        assert code == 0, err
        got = load_file(str(tmp_path / f"hf-{src}" / "model.safetensors"))
        if ref is None:
            ref = got
        else:
            assert got.keys() == ref.keys() and all(torch.equal(got[k], ref[k]) for k in ref)
