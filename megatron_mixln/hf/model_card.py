"""The README.md model card of an export: positions, tokens trained, last validation perplexity, the run config."""
from __future__ import annotations

import json

from megatron_mixln.model.positions import format_positions


def training_summary(meta: dict) -> dict:
    """Iteration, tokens trained and run config out of the trainer's client state (empty when absent)."""
    mixln = meta.get("mixln") if isinstance(meta.get("mixln"), dict) else {}
    train_state = mixln.get("train_state") or {}
    training = mixln.get("training_config") or {}
    model = mixln.get("model_config") or {}
    out = {"iteration": train_state.get("iteration"), "training_config": training}
    if train_state.get("consumed_samples") is not None and model.get("seq_length"):
        out["tokens"] = int(train_state["consumed_samples"]) * int(model["seq_length"])
    return out


def last_validation_ppl(run_dir: str | None, iteration: int | None = None) -> float | None:
    """The last `valid_ppl` at or before `iteration` in the run's metrics.jsonl, if the run directory is at hand."""
    import os

    path = os.path.join(run_dir, "metrics.jsonl") if run_dir else None
    if not path or not os.path.isfile(path):
        return None
    last = None
    with open(path) as f:
        for line in f:
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if isinstance(rec, dict) and rec.get("valid_ppl") is not None and (
                    iteration is None or not isinstance(rec.get("step"), int) or rec["step"] <= iteration):
                last = rec["valid_ppl"]
    return last


def model_card(config, summary: dict, architecture: str, custom: bool, valid_ppl: float | None, source: str,
               dtype: str, boundary: tuple[int, str] | None = None) -> str:
    """README.md text. `architecture`: the class transformers loads (config.json's architectures[0]);
    `boundary`: (id, token) every training document followed, None without a tokenizer."""
    positions = format_positions(config.positions)
    load = ("AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)" if custom
            else f"AutoModelForCausalLM.from_pretrained(DIR)  # stock {architecture}")
    lines = [
        "---", "library_name: transformers", "pipeline_tag: text-generation", "tags: [llama, mix-ln, megatron-mixln]",
        "---", "", f"# LLaMA-shaped model, norm positions `{positions}`", "",
        f"Exported by megatron-mixln's `tools/convert_to_hf.py` from `{source}` ({dtype}).", "",
        "| field | value |", "|---|---|",
        f"| norm positions (per layer) | `{positions}` |",
        f"| normalization | {config.normalization}, eps {config.norm_epsilon}, final norm {config.final_norm} |",
        f"| layers / hidden / ffn | {config.num_layers} / {config.hidden_size} / {config.ffn_hidden_size} |",
        f"| heads / kv heads | {config.num_attention_heads} / {config.num_query_groups} |",
        f"| vocab (padded) | {config.vocab_size} |", f"| tied embeddings | {config.tie_embeddings} |",
        f"| RoPE base / sequence length | {config.rotary_base:g} / {config.seq_length} |",
        f"| iterations trained | {summary.get('iteration', 'unknown')} |",
        f"| tokens trained | {summary.get('tokens', 'unknown')} |",
        f"| last validation perplexity | {'unknown' if valid_ppl is None else f'{valid_ppl:.4g}'} |",
        "", "## Use", "", "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer",
        f"model = {load}",
        "tokenizer = AutoTokenizer.from_pretrained(DIR" + (", trust_remote_code=True)" if custom else ")"), "```", "",
        "lm-evaluation-harness (its defaults condition every document on `bos_token`, here the document "
        "boundary the model was trained with):", "", "```bash",
        "lm_eval --model hf --model_args pretrained=DIR" + (",trust_remote_code=True" if custom else "")
        + " --tasks hellaswag,arc_easy", "```", "",
        *_boundary_lines(boundary),
        "## Model config", "", "```json", json.dumps(config.to_dict(), indent=1), "```",
    ]
    if summary.get("training_config"):
        lines += ["", "## Run config", "", "```json", json.dumps(summary["training_config"], indent=1, default=str),
                  "```"]
    return "\n".join(lines) + "\n"


def _boundary_lines(boundary: tuple[int, str] | None) -> list[str]:
    if boundary is None:
        return []
    tid, token = boundary
    return ["## Document boundary", "",
            f"Training packed documents separated by the end-of-document token `{token}` (id {tid}) and never "
            f"saw a BOS, so `bos_token` is `{token}`: start a text with id {tid} (lm-eval does: "
            f"`prefix_token_id` = {tid}). The tokenizer adds nothing around a text and encodes "
            "special-token strings in the text as text.", ""]
