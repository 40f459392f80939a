"""Cross-block fusion on the fused Triton kernels: same logits and gradients as the unfused model,
and the saving it exists for -- per handed-off boundary one kernel launch less forward and one less
backward, and fewer bytes moved (counted op by op with TrafficCounter)."""
import pytest
import torch
import torch.nn.functional as F
from triton_env import needs_kernels

from megatron_mixln.kernels.traffic import TrafficCounter
from megatron_mixln.model import ModelConfig, build_model

pytestmark = needs_kernels
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
MIXES = ["pre*4", "post,post,pre,pre", "peri,lns,post,pre"]


def pair(positions):
    kw = dict(vocab_size=64, hidden_size=48, ffn_hidden_size=80, num_layers=4, num_attention_heads=4,
              seq_length=16, norm_position=positions, norm_impl="triton")
    torch.manual_seed(0)
    fused = build_model(ModelConfig(**kw), device=DEVICE)
    unfused = build_model(ModelConfig(**kw, cross_block_fusion=False), device=DEVICE)
    unfused.load_state_dict(fused.state_dict())
    return fused, unfused


def step(model, tokens, counter):
    with counter:
        logits = model(tokens)
        loss = F.cross_entropy(logits.flatten(0, 1).float(), tokens.roll(-1, 1).flatten())
        loss.backward()
    return logits.detach(), {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("positions", MIXES)
def test_fused_kernels_same_results_fewer_kernels_and_bytes(positions):
    fused, unfused = pair(positions)
    tokens = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1)).to(DEVICE)
    cf, cu = TrafficCounter(), TrafficCounter()
    lf, gf = step(fused, tokens, cf)
    lu, gu = step(unfused, tokens, cu)
    torch.testing.assert_close(lf, lu, atol=1e-5, rtol=1e-5)
    for name in gf:
        torch.testing.assert_close(gf[name], gu[name], atol=1e-5, rtol=1e-4, msg=f"grad of {name}")

    plan = [b.hand_off_residual for b in fused.layers]
    assert plan == {"pre*4": [True] * 4, "post,post,pre,pre": [False, False, True, True],
                    "peri,lns,post,pre": [True, False, False, True]}[positions]
    into_block, into_final = sum(plan[:-1]), int(plan[-1])
    # one add_norm kernel per norm either way, forward and backward...
    assert cf.count("mixln.add_norm_fwd.default") == cu.count("mixln.add_norm_fwd.default")
    assert cf.count("mixln.add_norm_bwd.default") == cu.count("mixln.add_norm_bwd.default")
    # ...but no separate residual add forward, nor (into a block, whose input is used twice: norm and
    # residual) the add that sums the stream's two gradients backward: add_norm_bwd adds it in-kernel
    saved_adds = 2 * into_block + into_final
    assert cu.count("aten.add.Tensor") - cf.count("aten.add.Tensor") == saved_adds
    assert cu.kernels - cf.kernels == saved_adds
    # bytes, in activation passes (batch x seq x hidden x 4): forward saves the add (read h, d; write
    # h + d: 3) but add_norm now reads d and writes h + d (2): net 1; backward saves the gradient add
    # (3) but add_norm_bwd reads the residual's gradient (1): net 2. Into the final norm: forward only.
    act = tokens.numel() * fused.config.hidden_size * 4
    assert cu.bytes - cf.bytes == (3 * into_block + into_final) * act
