"""Helpers of the Hugging Face tests: tiny models with non-trivial weights, exports, greedy decoding."""
from __future__ import annotations

import os
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
TINY = dict(vocab_size=320, hidden_size=32, ffn_hidden_size=48, num_layers=4, num_attention_heads=4, seq_length=64)


def train_spm(prefix: str) -> str:
    from megatron_mixln.data.tokenizer_training import TokenizerTrainOptions, train_tokenizer

    text = [line.strip() for line in open(ROOT / "README.md", encoding="utf-8") if line.strip()]
    corpus = prefix + ".jsonl"
    import json

    with open(corpus, "w") as f:
        for line in text:
            f.write(json.dumps({"text": line}) + "\n")
    return train_tokenizer(TokenizerTrainOptions(inputs=[corpus], output_prefix=prefix, vocab_size=300))


def tiny_model(seed: int = 0, **overrides):
    """(ModelConfig, Transformer in eval mode) whose norm weights/biases are not 1/0 (so a misplaced norm shows)."""
    from megatron_mixln.model import ModelConfig, build_model

    torch.manual_seed(seed)
    config = ModelConfig(**{**TINY, **overrides})
    model = build_model(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.3 * torch.randn_like(p))
            else:
                p.mul_(3.0)  # larger activations than init: attention is not uniform
    return config, model


def save_tiny(path, seed: int = 0, **overrides):
    from megatron_mixln.parallel.checkpoint_convert import save_plain

    config, model = tiny_model(seed, **overrides)
    save_plain(model.state_dict(), str(path), config)
    return config, model


def load_hf(path, dtype=torch.float32):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), trust_remote_code=True, dtype=dtype).eval()


@torch.no_grad()
def greedy(model, tokens: torch.Tensor, new: int) -> torch.Tensor:
    """Greedy decoding with this stack's model, no cache: the full sequence is re-run every step."""
    for _ in range(new):
        nxt = model(tokens)[:, -1].float().argmax(-1, keepdim=True)
        tokens = torch.cat([tokens, nxt], dim=1)
    return tokens


def run_tool(name: str, *args: str) -> tuple[int, str, str]:
    """tools/<name>.py main(argv) in-process; -> (return code, stdout, stderr)."""
    import contextlib
    import importlib.util
    import io

    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = module.main(list(args))
    return code, out.getvalue(), err.getvalue()


def hf_env() -> dict:
    return dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
