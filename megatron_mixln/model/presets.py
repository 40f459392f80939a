"""LLaMA model shapes from docs/paper.md#model-presets (SwiGLU, RoPE base 10000, untied head, vocab 32000)."""

# name: (hidden_size, ffn_hidden_size, num_attention_heads, num_layers)
_SHAPES = {
    "9m": (128, 352, 4, 4),
    "20m": (256, 688, 4, 4),
    "35m": (384, 1024, 8, 6),
    "60m": (512, 1376, 8, 8),
    "71m": (512, 1368, 8, 12),
    "100m": (640, 1708, 10, 12),
    "130m": (768, 2048, 12, 12),
    "250m": (768, 2560, 16, 24),
    "350m": (1024, 2736, 16, 24),
    "1b": (2048, 5461, 32, 24),
    "3b": (2560, 6848, 32, 32),
    "7b": (4096, 11008, 32, 32),
}

# Mix-LN's post-layer count k used in the paper for each size (docs/paper.md#training-recipe).
PAPER_POST_LN_LAYERS = {"71m": 3, "130m": 3, "250m": 6, "1b": 6, "7b": 2}

PRESETS = {
    name: dict(hidden_size=h, ffn_hidden_size=f, num_attention_heads=a, num_layers=n)
    for name, (h, f, a, n) in _SHAPES.items()
}


def preset(name: str) -> dict:
    try:
        return dict(PRESETS[name])
    except KeyError:
        raise ValueError(f"preset: unknown preset {name!r}; allowed: {', '.join(PRESETS)}") from None
