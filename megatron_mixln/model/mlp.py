"""SwiGLU feed-forward: down(silu(gate(x)) * up(x))."""
import torch.nn.functional as F
from torch import nn


class SwiGLU(nn.Module):
    """`bias`: a bias on gate, up and down (--add-bias-linear); LLaMA has none."""

    def __init__(self, hidden_size: int, ffn_hidden_size: int, bias: bool = False):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, ffn_hidden_size, bias=bias)
        self.up_proj = nn.Linear(hidden_size, ffn_hidden_size, bias=bias)
        self.down_proj = nn.Linear(ffn_hidden_size, hidden_size, bias=bias)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
