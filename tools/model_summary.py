#!/usr/bin/env python
"""Per-layer norm positions, parameter counts and training memory of a model, without allocating it.

    python tools/model_summary.py --preset 7b --norm-position mix --post-ln-layers 2
"""
from __future__ import annotations

import argparse
import sys

from megatron_mixln.cli import add_dataclass_args, config_from_flags, given_fields
from megatron_mixln.errors import ArgumentParser, run_tool
from megatron_mixln.model import PRESETS, ModelConfig, build_model, count_parameters
from megatron_mixln.model.two_stream import stream_count
from megatron_mixln.planning import activation_bytes

GIB = 1024**3


def memory_table(n_params: int) -> list[tuple[str, float, float]]:
    """(what, GiB in bf16 setup, GiB in fp32 setup).

    bf16 column: bf16 weights + bf16 grads + fp32 master weights + fp32 Adam m, v (DeepSpeed/Megatron
    mixed precision, 2+2+12 = 16 bytes/param). fp32 column: fp32 weights, grads, Adam m, v (16 bytes/param).
    """
    return [
        ("weights", 2 * n_params / GIB, 4 * n_params / GIB),
        ("gradients", 2 * n_params / GIB, 4 * n_params / GIB),
        ("Adam states (+ fp32 master for bf16)", 12 * n_params / GIB, 8 * n_params / GIB),
        ("total model states", 16 * n_params / GIB, 16 * n_params / GIB),
    ]


def summarize(cfg: ModelConfig) -> str:
    model = build_model(cfg, device="meta")
    total = count_parameters(model)
    no_embed = count_parameters(model, exclude_embeddings=True)
    lines = [
        f"layers {cfg.num_layers}, hidden {cfg.hidden_size}, ffn {cfg.ffn_hidden_size}, heads "
        f"{cfg.num_attention_heads} (kv {cfg.num_query_groups}), vocab {cfg.vocab_size}, "
        f"{cfg.normalization}, tied={cfg.tie_embeddings}, final_norm={cfg.final_norm}",
        f"norm positions: {cfg.positions_str}",
    ]
    if cfg.zoo_options():  # docs/norm-zoo.md
        pointwise = f", alpha init attn/ffn/final {cfg.dyt_alpha_init}" if cfg.norm_kind in ("dyt", "derf") else ""
        scale = (f", embedding x learnable scalar (init sqrt({cfg.hidden_size})={cfg.hidden_size ** 0.5:.4g})"
                 if cfg.learnable_embedding_scale else "")
        lines.append(f"norm zoo: qk-norm {cfg.qk_norm}{' (per-head gain)' if cfg.qk_norm_per_head_gain else ''}"
                     f"{pointwise}{scale}")
    biases = [name for name, on in (("q/k/v", cfg.qkv_bias), ("o, gate/up/down", cfg.add_bias_linear),
                                    ("LM head", cfg.add_output_layer_bias)) if on]
    if biases:  # counted in every layer's params and the total below
        lines.append(f"linear biases: {', '.join(biases)}")
    lines += [
        "",
        f"{'layer':>5}  {'position':<12} {'residual a':>10} {'out scale':>9} {'norm params':>11} {'params':>14}",
    ]
    for block in model.layers:
        n = sum(p.numel() for p in block.parameters())
        norms = sum(p.numel() for name, p in block.named_parameters() if "norm" in name)  # residual and q/k/v norms
        lines.append(f"{block.layer_number:>5}  {block.position:<12} {block.residual_scale:>10.4f} "
                     f"{block.out_scale:>9.4f} {norms:>11,} {n:>14,}")
    lines += [
        "",
        f"parameters: {total:,} total, {no_embed:,} without embeddings",
        "",
        f"{'memory (GiB)':<40} {'bf16 mixed':>11} {'fp32':>9}",
    ]
    lines += [f"{what:<40} {b:>11.2f} {f:>9.2f}" for what, b, f in memory_table(total)]
    lines += ["", *activation_lines(cfg)]
    return "\n".join(lines)


def activation_lines(cfg: ModelConfig) -> list[str]:
    """Activations of one sequence of --seq-length tokens (bf16, fused add+norm kernels), from the memory
    planner; a two-stream position (siamese, residual-dual) carries 2 residual streams between layers."""
    streams = stream_count(cfg.positions)
    plain = activation_bytes(cfg, 1, cfg.seq_length, bf16=True, impl="triton")
    kept = activation_bytes(cfg, 1, cfg.seq_length, bf16=True, impl="triton", recompute=True)
    boundary = 2 * streams * cfg.seq_length * cfg.hidden_size
    return [
        f"residual streams between layers: {streams} ({boundary / 2**20:.2f} MiB per sequence at a layer or "
        "pipeline-stage boundary, bf16)",
        f"activations per sequence of {cfg.seq_length} tokens (bf16): {plain['total'] / GIB:.3f} GiB, "
        f"{kept['total'] / GIB:.3f} GiB with --recompute-activations",
    ]


def main(argv=None) -> int:
    return run_tool(_main, "model_summary", argv)


def _main(argv) -> int:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                            allow_abbrev=False)
    parser.add_argument("--preset", choices=list(PRESETS), help="model shape; other flags override it")
    add_dataclass_args(parser, ModelConfig, "model")
    args = parser.parse_args(argv)
    print(summarize(config_from_flags(ModelConfig, given_fields(args, ModelConfig), args.preset)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
