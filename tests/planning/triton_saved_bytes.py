"""Run as a script in a fresh process with TRITON_INTERPRET=1 (set before triton is imported): saved bytes
of one block with the Triton add+norm kernels, interpreted on CPU, and the planner's formula, as JSON."""
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from planning_testlib import saved_tensor_bytes  # noqa: E402

from megatron_mixln.model import ModelConfig  # noqa: E402
from megatron_mixln.model.block import Block  # noqa: E402
from megatron_mixln.planning import block_activation_bytes  # noqa: E402


def main():
    out = {}
    for position in ("pre", "post", "peri", "deepnorm", "siamese", "residual-dual"):
        for norm, dtype in (("RMSNorm", torch.bfloat16), ("LayerNorm", torch.float32)):
            cfg = ModelConfig(vocab_size=128, hidden_size=64, ffn_hidden_size=96, num_layers=3,
                              num_attention_heads=4, num_query_groups=2, seq_length=16, norm_position=position,
                              norm_impl="triton", normalization=norm)
            # layer 2; two-stream layers also as layer 1, which starts both streams from one tensor
            for layer in (2, 1) if position == "siamese" else (2,):
                block = Block(cfg, layer).to(dtype)
                x = torch.randn(2, 16, 64, dtype=dtype, requires_grad=True)
                if position in ("siamese", "residual-dual") and layer == 2:  # the pair of streams
                    x = (x, torch.randn(2, 16, 64, dtype=dtype, requires_grad=True))
                got, y = saved_tensor_bytes(lambda: block(x), exclude_params=list(block.parameters()))
                sum(t.float().sum() for t in (y if isinstance(y, tuple) else (y,))).backward()
                want = sum(block_activation_bytes(cfg, position, 2, 16, dtype == torch.bfloat16, "triton",
                                                  first=layer == 1).values())
                out[f"{position}/{norm}/{dtype}/layer{layer}"] = [got, want]
    # the norm zoo's kernels: norm-then-add (reordered) and add + DyT/Derf
    for position, norm, dtype in (("reordered", "RMSNorm", torch.bfloat16), ("reordered", "LayerNorm", torch.float32),
                                  ("pre", "DyT", torch.bfloat16), ("peri", "Derf", torch.float32)):
        cfg = ModelConfig(vocab_size=128, hidden_size=64, ffn_hidden_size=96, num_layers=3, num_attention_heads=4,
                          num_query_groups=2, seq_length=16, norm_position=position, norm_impl="triton",
                          normalization=norm)
        block = Block(cfg, 2).to(dtype)
        x = torch.randn(2, 16, 64, dtype=dtype, requires_grad=True)
        got, y = saved_tensor_bytes(lambda: block(x), exclude_params=list(block.parameters()))
        y = y[0] + y[1] if isinstance(y, tuple) else y
        y.float().sum().backward()
        want = sum(block_activation_bytes(cfg, position, 2, 16, dtype == torch.bfloat16, "triton").values())
        out[f"{position}/{norm}/{dtype}"] = [got, want]
    print(json.dumps(out))


if __name__ == "__main__":
    main()
