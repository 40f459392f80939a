"""configs/paper/*.yaml: the Mix-LN paper's recipe per size (docs/paper.md#training-recipe), checked field by field
after --config parsing, plus the reference embedding init they select."""
import math
import os

import pytest

from megatron_mixln.training.arguments import parse_configs

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
# size: (peak lr, steps, warm-up, post layers k, layers) -- docs/paper.md#training-recipe (350M: the LayerNorm-Scaling
# paper's recipe; 7B: 150K planned steps with the advised ~10% warm-up).
RECIPES = {"71m": (1e-3, 10_000, 1_000, 3, 12), "130m": (1e-3, 20_000, 2_000, 3, 12),
           "250m": (1e-3, 40_000, 4_000, 6, 24), "350m": (5e-4, 60_000, 6_000, 6, 24),
           "1b": (5e-4, 100_000, 1_000, 6, 24), "7b": (5e-4, 150_000, 15_000, 2, 32)}


@pytest.mark.parametrize("size", sorted(RECIPES))
def test_paper_config(size):
    lr, steps, warmup, k, layers = RECIPES[size]
    model, train = parse_configs(["--config", os.path.join(REPO, "configs", "paper", f"{size}.yaml")])
    assert (train.lr, train.train_iters, train.lr_warmup_iters) == (lr, steps, warmup)
    assert train.min_lr == pytest.approx(0.1 * lr) and train.lr_decay_style == "cosine"
    assert train.optimizer == "adam" and train.weight_decay == 0.0 and train.clip_grad == 0.0
    assert train.global_batch_size == 512 and model.seq_length == 256
    assert model.num_layers == layers and model.positions_str == f"post*{k},pre*{layers - k}"
    assert model.scaled_embedding_init and train.eval_tokens == 10_000_000
    assert train.sample_mode == "pack" and not train.bf16_pure  # the reference modes are flags on top


def test_reference_modes_on_top_of_a_paper_config():
    model, train = parse_configs(["--config", os.path.join(REPO, "configs", "paper", "71m.yaml"),
                                  "--sample-mode", "truncate-pad", "--no-bf16", "--bf16-pure",
                                  "--scaled-output-init-layers", "pre", "--freeze-pad-embedding"])
    assert train.sample_mode == "truncate-pad" and train.bf16_pure and not train.bf16
    assert model.scaled_output_layers == tuple(range(4, 13)) and model.freeze_pad_embedding


def test_paper_embedding_std():
    import torch

    from megatron_mixln.model import build_model

    model, _ = parse_configs(["--config", os.path.join(REPO, "configs", "paper", "71m.yaml"),
                              "--num-layers", "3", "--vocab-size", "8000"])
    torch.manual_seed(0)
    std = build_model(model).embed.weight.std().item()
    assert std == pytest.approx(math.sqrt(2 / 5), rel=0.01)
