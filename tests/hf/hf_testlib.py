"""Helpers of the Hugging Face tests: tiny models with non-trivial weights, exports, greedy decoding."""
from __future__ import annotations

import os
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
TINY = dict(vocab_size=320, hidden_size=32, ffn_hidden_size=48, num_layers=4, num_attention_heads=4, seq_length=64)


def train_spm(prefix: str) -> str:
    from megatron_mixln.data.tokenizer_training import TokenizerTrainOptions, train_tokenizer

    docs = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    text = [line.strip() for doc in docs for line in open(doc, encoding="utf-8") if line.strip()]
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
            if "norm" in name or "scale" in name or name.endswith(".bias"):  # norms, c1, linear biases (0 at init)
                p.add_(0.3 * torch.randn_like(p))
            else:
                p.mul_(3.0)  # larger activations than init: attention is not uniform
    return config, model


def save_tiny(path, seed: int = 0, **overrides):
    from megatron_mixln.checkpoint.convert import save_plain

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


QUESTIONS = [
    ("The norm of every layer sits", ["before the attention", "after the residual add", "nowhere"]),
    ("Mix-LN puts Post-LN in", ["the first layers", "the last layers"]),
    ("The tokenizer is trained on", ["the corpus", "nothing at all", "a model", "the tests"]),
    ("Checkpoints are written to", ["a temporary name", "the console"]),
    ("Pretraining runs on", ["many processes", "one core", "no data"]),
]


def write_mc_task(task_dir, answers: list[int], name: str = "tiny_mc") -> str:
    """A multiple-choice lm-eval task: <name>.yaml + <name>.jsonl (question, choices, answer index)."""
    import json

    task_dir = Path(task_dir)
    task_dir.mkdir(parents=True, exist_ok=True)
    with open(task_dir / f"{name}.jsonl", "w") as f:
        for (q, choices), a in zip(QUESTIONS, answers):
            f.write(json.dumps({"question": q, "choices": choices, "answer": a}) + "\n")
    (task_dir / f"{name}.yaml").write_text(
        f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {task_dir / (name + '.jsonl')}\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: \"{{question}}\"\n"
        "doc_to_choice: \"{{choices}}\"\ndoc_to_target: \"{{answer}}\"\n"
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
        "  - metric: acc_norm\n    aggregation: mean\n    higher_is_better: true\n")
    return str(task_dir)


@torch.no_grad()
def hand_logliks(model, tokenizer, context: str, choices: list[str]) -> list[float]:
    """sum log p(continuation | context) per choice with this stack's model; the continuation is " " + choice,
    split off the whole string's tokens after the context's tokens (as lm-eval does), no BOS."""
    out = []
    ctx = tokenizer(context, add_special_tokens=False).input_ids
    for choice in choices:
        whole = tokenizer(context + " " + choice, add_special_tokens=False).input_ids
        cont = whole[len(ctx):]
        logp = torch.log_softmax(model(torch.tensor([whole[:-1]])).double()[0], -1)
        out.append(sum(logp[len(ctx) - 1 + j, t].item() for j, t in enumerate(cont)))
    return out


def hand_accuracy(model, tokenizer, answers: list[int]) -> tuple[float, float, list[list[float]]]:
    """(acc, acc_norm, log-likelihoods); acc_norm divides by the choice's length in characters, without the
    " " delimiter (lm-eval 0.4.13, api/task.py: `completion_len = len(choice)`)."""
    import numpy as np

    acc = norm = 0
    lls = []
    for (q, choices), a in zip(QUESTIONS, answers):
        ll = hand_logliks(model, tokenizer, q, choices)
        lls.append(ll)
        acc += int(np.argmax(ll) == a)
        norm += int(np.argmax([x / len(c) for x, c in zip(ll, choices)]) == a)
    return acc / len(QUESTIONS), norm / len(QUESTIONS), lls
