"""tools/convert_from_hf.py: stock HF LLaMA (sharded safetensors, pytorch_model.bin; GQA, tied), the Mix-LN
reference code's layout (built from the published formulas), round trip, and `pretrain --load`."""
import json

import pytest
import torch

import reference_mixln
from hf_testlib import run_tool, save_tiny


def _our_model(ckpt_dir):
    from megatron_mixln.model import build_model
    from megatron_mixln.checkpoint.reader import read_full_state_dict

    plain, config, _, _ = read_full_state_dict(str(ckpt_dir))
    model = build_model(config, device="meta")
    model.to_empty(device="cpu")
    model.load_state_dict(plain, strict=True)
    return config, model.eval()


@pytest.mark.parametrize("layout", ["safetensors-sharded-gqa", "bin-tied"])
def test_stock_llama_imports_with_equal_logits(tmp_path, layout):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    gqa, tied = "gqa" in layout, "tied" in layout
    cfg = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
                      num_key_value_heads=2 if gqa else 4, max_position_embeddings=64, tie_word_embeddings=tied,
                      rope_parameters={"rope_type": "default", "rope_theta": 5000.0})
    hf = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for n, p in hf.named_parameters():
            p.add_(0.3 * torch.randn_like(p)) if "norm" in n else p.mul_(3.0)
    if layout.startswith("safetensors"):
        hf.save_pretrained(str(tmp_path / "hf"), max_shard_size="30KB")
        assert (tmp_path / "hf" / "model.safetensors.index.json").is_file()
    else:
        cfg.save_pretrained(str(tmp_path / "hf"))
        torch.save({k: v for k, v in hf.state_dict().items() if not (tied and k == "lm_head.weight")},
                   tmp_path / "hf" / "pytorch_model.bin")
    code, out, err = run_tool("convert_from_hf", "--hf", str(tmp_path / "hf"), "--output", str(tmp_path / "ckpt"))
    assert code == 0, err
    config, model = _our_model(tmp_path / "ckpt")
    assert config.positions == ("pre",) * 3 and config.rotary_base == 5000.0 and config.tie_embeddings is tied
    assert config.num_query_groups == (2 if gqa else 4)
    meta = json.loads((tmp_path / "ckpt" / "iter_0000000" / "mixln_meta.json").read_text())
    assert meta["train_state"]["iteration"] == 0 and (tmp_path / "ckpt" / "latest").read_text() == "iter_0000000"
    tokens = torch.randint(0, 96, (2, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (model(tokens) - hf(tokens).logits).abs().max() <= 1e-5


@pytest.mark.parametrize("kinds,flags", [
    (["post", "pre", "pre"], ["--norm-position", "mix", "--post-ln-layers", "1"]),  # NORM_TYPE=post_pre POST_NUM=1
    (["sandwich"] * 2, ["--norm-position", "sandwich"]),
])
def test_mixln_reference_layout_imports_with_equal_logits(tmp_path, kinds, flags):
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    vocab, hidden, ffn, heads = 64, 32, 40, 4
    sd = reference_mixln.random_weights(kinds, vocab, hidden, ffn, heads)
    LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=len(kinds),
                num_attention_heads=heads, max_position_embeddings=64).save_pretrained(str(tmp_path / "ref"))
    save_file({k: v.float().contiguous() for k, v in sd.items()}, str(tmp_path / "ref" / "model.safetensors"))
    code, _, err = run_tool("convert_from_hf", "--hf", str(tmp_path / "ref"), "--output", str(tmp_path / "ckpt"), *flags)
    assert code == 0, err
    config, model = _our_model(tmp_path / "ckpt")
    tokens = torch.randint(0, vocab, (2, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = reference_mixln.forward({k: v.float().double() for k, v in sd.items()}, kinds, tokens, heads)
        ours = model(tokens).double()
    assert ref.abs().max() > 1.0
    assert (ours - ref).abs().max() <= 1e-4 * ref.abs().max()
    # without --norm-position the post layers are not guessed; a contradicting one names the layer
    code, _, err = run_tool("convert_from_hf", "--hf", str(tmp_path / "ref"), "--output", str(tmp_path / "x"))
    assert code == 2 and "--norm-position" in err and "layer 0" in err and not (tmp_path / "x").exists()
    code, _, err = run_tool("convert_from_hf", "--hf", str(tmp_path / "ref"), "--output", str(tmp_path / "x"),
                            "--norm-position", "pre")
    assert code == 2 and "layer 0" in err and "'pre'" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("overrides", [
    dict(norm_position="post,peri,lns,deepnorm,deeppost,pre", normalization="LayerNorm", num_layers=6),
    dict(norm_position="mix", post_ln_layers=2, num_query_groups=2, tie_embeddings=True, final_norm=False),
    dict(norm_position="pre", scaled_embedding_init=True, rotary_base=500000.0),  # stock LlamaForCausalLM
    dict(norm_position="siamese", num_layers=3),  # two residual streams, six norms per layer, three final norms
    dict(norm_position="siamese", siamese_variant="hybrid_pre", num_layers=2),  # four norms and c1 per layer
])
def test_round_trip_is_bit_identical(tmp_path, overrides):
    from megatron_mixln.checkpoint.convert import load_plain
    from megatron_mixln.checkpoint.reader import read_full_state_dict

    save_tiny(tmp_path / "plain", **overrides)
    assert run_tool("convert_to_hf", "--checkpoint", str(tmp_path / "plain"), "--output", str(tmp_path / "hf"))[0] == 0
    assert run_tool("convert_from_hf", "--hf", str(tmp_path / "hf"), "--output", str(tmp_path / "back"),
                    "--iteration", "7")[0] == 0
    assert (tmp_path / "back" / "latest").read_text() == "iter_0000007"
    a, config_a, _ = load_plain(str(tmp_path / "plain"))
    b, config_b, _, _ = read_full_state_dict(str(tmp_path / "back"))
    assert config_a == config_b
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


def test_imported_checkpoint_continues_pretraining(tmp_path, single_rank):
    """pretrain --load accepts the import: it resumes at iteration 0 from the imported weights."""
    import numpy as np

    from megatron_mixln.training.config import TrainingConfig
    from megatron_mixln.training.trainer import pretrain

    config, model = save_tiny(tmp_path / "plain", norm_position="mix", post_ln_layers=1, num_layers=2, seq_length=16)
    assert run_tool("convert_to_hf", "--checkpoint", str(tmp_path / "plain"), "--output", str(tmp_path / "hf"))[0] == 0
    assert run_tool("convert_from_hf", "--hf", str(tmp_path / "hf"), "--output", str(tmp_path / "ckpt"))[0] == 0

    class Tokens:
        def __init__(self, n, seed):
            self.t = np.random.default_rng(seed).integers(0, config.vocab_size, (n, 17), dtype=np.int64)

        def __len__(self):
            return len(self.t)

        def __getitem__(self, i):
            return {"tokens": self.t[i]}

    cfg = TrainingConfig(micro_batch_size=2, global_batch_size=2, train_iters=1, lr=1e-7, eval_iters=0,
                         log_interval=1, grad_norm_interval=0, seed=3, load=str(tmp_path / "ckpt"), zero_stage=1)
    summary = pretrain(config, cfg, (Tokens(16, 0), Tokens(4, 1)))
    engine = summary["engine"]
    try:
        assert summary["train_state"]["iteration"] == 1 and [h["step"] for h in summary["history"]] == [1]
        trained = engine.module.state_dict()
        for k, v in model.state_dict().items():
            assert (trained[k].float() - v).abs().max() < 1e-5, k  # one tiny step away from the imported weights
    finally:
        engine.destroy()


def test_import_keeps_the_tokenizer_files_and_exports_them_again(tmp_path, spm_model):
    """convert_from_hf copies the source's tokenizer files bit for bit; the checkpoint records them, so an
    export of the import ships the same tokenizer encoding the same ids."""
    import sentencepiece as spm
    from transformers import AutoTokenizer

    save_tiny(tmp_path / "plain", norm_position="mix", post_ln_layers=1, num_layers=2)
    assert run_tool("convert_to_hf", "--checkpoint", str(tmp_path / "plain"), "--output", str(tmp_path / "hf"),
                    "--tokenizer", spm_model)[0] == 0
    code, out, err = run_tool("convert_from_hf", "--hf", str(tmp_path / "hf"), "--output", str(tmp_path / "ckpt"))
    assert code == 0, err
    tok_dir = tmp_path / "ckpt" / "tokenizer"
    assert json.loads(out)["tokenizer"] == str(tok_dir)
    names = sorted(p.name for p in tok_dir.iterdir())
    assert names == ["tokenizer.model", "tokenizer_config.json"]
    for name in names:
        assert (tok_dir / name).read_bytes() == (tmp_path / "hf" / name).read_bytes()
    code, _, err = run_tool("convert_to_hf", "--checkpoint", str(tmp_path / "ckpt"), "--output", str(tmp_path / "again"))
    assert code == 0, err
    assert (tmp_path / "again" / "tokenizer.model").read_bytes() == open(spm_model, "rb").read()
    sp = spm.SentencePieceProcessor(model_file=spm_model)
    text = "  Mix-LN\tputs <s> Post-LN\n\nin the \ufb01rst layers "
    assert AutoTokenizer.from_pretrained(str(tmp_path / "again"))(text).input_ids == sp.encode(text)
