"""The per-position activation formulas against the bytes autograd really saves (CPU), with and
without recomputation, and against the CUDA allocator when a GPU is present."""
import functools

import pytest
import torch
from torch.utils.checkpoint import checkpoint

from planning_testlib import saved_tensor_bytes

from megatron_mixln.model import ModelConfig, build_model
from megatron_mixln.model.block import Block
from megatron_mixln.model.positions import TWO_STREAM
from megatron_mixln.planning import activation_bytes, block_activation_bytes
from megatron_mixln.training.loss import token_losses

POSITIONS = ["pre", "post", "peri", "lns", "deepnorm", "deeppost", "mix", "post,peri,pre", "siamese", "siamese-hybrid_pre",
             "residual-dual"]
B, S = 2, 16


def _config(position, **kw):
    if position == "siamese-hybrid_pre":  # SiameseNorm's OLMo block (--siamese-variant hybrid_pre)
        position, kw = "siamese", {**kw, "siamese_variant": "hybrid_pre"}
    fields = dict(vocab_size=128, hidden_size=64, ffn_hidden_size=96, num_layers=3, num_attention_heads=4,
                  num_query_groups=2, seq_length=S, norm_position=position,
                  post_ln_layers=1 if position == "mix" else None, norm_impl="torch")
    return ModelConfig(**{**fields, **kw})


def _model_saved_bytes(cfg, dtype, recompute):
    torch.manual_seed(0)
    model = build_model(cfg).to(dtype)
    if recompute:  # what --recompute-activations applies (training.model_setup.apply_activation_checkpointing)
        for block in model.layers:
            block.forward = (_checkpoint_streams_as_arguments(block.forward) if cfg.positions[0] in TWO_STREAM
                             else functools.partial(checkpoint, block.forward, use_reentrant=False))
    tokens = torch.randint(0, cfg.vocab_size, (B, S + 1))
    saved, loss = saved_tensor_bytes(lambda: token_losses(model(tokens[:, :-1]), tokens[:, 1:]).mean(),
                                     exclude_params=list(model.parameters()))
    loss.backward()  # the graph is whole: the backward runs
    return saved


def _checkpoint_streams_as_arguments(forward):
    """checkpoint(forward) for a two-stream block. The checkpoint keeps its tensor arguments through a
    node whose saved tensors the hooks see; a pair of streams is kept as well, but inside a Python
    tuple the hooks cannot see, so the pair's tensors are passed as separate arguments (same bytes)."""
    def run(*streams):
        return forward(streams if len(streams) == 2 else streams[0])

    return lambda h: checkpoint(run, *(h if isinstance(h, tuple) else (h,)), use_reentrant=False)


@pytest.mark.parametrize("recompute", [False, True], ids=["no-recompute", "recompute"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("position", POSITIONS)
def test_model_activations_equal_saved_tensor_bytes(position, dtype, recompute):
    """Exact for the unfused residual stream; with cross-block fusion (the default) a recomputed model
    keeps fewer block inputs alive (a handed-off pair is not stored separately), so the formula is an
    upper bound there -- and exact again without recomputation."""
    cfg = _config(position, cross_block_fusion=False)
    predicted = activation_bytes(cfg, B, S, bf16=dtype == torch.bfloat16, impl="torch", recompute=recompute)
    measured = _model_saved_bytes(cfg, dtype, recompute)
    # recompute_peak is one block alive again during backward: not saved in forward (checked below).
    forward_saved = predicted["total"] - predicted["recompute_peak"]
    assert abs(measured - forward_saved) <= 16, (measured, predicted)
    fused = _model_saved_bytes(_config(position), dtype, recompute)
    assert fused <= forward_saved + 16 if recompute else abs(fused - forward_saved) <= 16, (fused, predicted)


ZOO = {  # the norm zoo (docs/norm-zoo.md): q/k/v norms, reordered/hybrid positions, DyT/Derf (+ embedding scale)
    "olmo2": dict(norm_position="reordered", qk_norm="full"),
    "qwen3-layernorm": dict(norm_position="pre,post,pre", qk_norm="head", normalization="LayerNorm"),
    "hybridnorm-star-dyt": dict(norm_position="hybridnorm-star", normalization="DyT", qk_norm_per_head_gain=True,
                                learnable_embedding_scale=True),
    "derf-mix": dict(norm_position="hybrid,peri,reordered", normalization="Derf", qk_norm="head",
                     learnable_embedding_scale=True),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("zoo", list(ZOO))
def test_zoo_model_activations_equal_saved_tensor_bytes(zoo, dtype):
    cfg = _config(ZOO[zoo]["norm_position"], **{k: v for k, v in ZOO[zoo].items() if k != "norm_position"})
    predicted = activation_bytes(cfg, B, S, bf16=dtype == torch.bfloat16, impl="torch", recompute=False)
    for fusion in (False, True):
        measured = _model_saved_bytes(cfg.replace(cross_block_fusion=fusion), dtype, False)
        assert abs(measured - predicted["total"]) <= 16, (fusion, measured, predicted)
    # the learnable embedding scale keeps the embedding output, with or without recomputation
    assert predicted["embedding"] == (B * S * cfg.hidden_size * (2 if dtype == torch.bfloat16 else 4)
                                      if cfg.learnable_embedding_scale else 0)
    recomputed = activation_bytes(cfg, B, S, bf16=dtype == torch.bfloat16, impl="torch", recompute=True)
    measured = _model_saved_bytes(cfg.replace(cross_block_fusion=False), dtype, True)
    assert abs(measured - (recomputed["total"] - recomputed["recompute_peak"])) <= 16, (measured, recomputed)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("position", ["pre", "post", "peri", "lns", "deepnorm", "deeppost", "siamese",
                                      "siamese-hybrid_pre", "residual-dual"])
def test_one_block_equals_its_formula(position, dtype):
    """Each block on its own (this is also the transient peak of recomputing it in backward)."""
    cfg = _config(position)
    position = cfg.positions[0]
    block = Block(cfg, 2).to(dtype)
    x = torch.randn(B, S, cfg.hidden_size, dtype=dtype, requires_grad=True)
    if position in TWO_STREAM:  # layer 2 of a two-stream model gets the pair of streams
        x = (x, torch.randn(B, S, cfg.hidden_size, dtype=dtype, requires_grad=True))
    measured, y = saved_tensor_bytes(lambda: block(x), exclude_params=list(block.parameters()))
    sum(t.float().sum() for t in (y if isinstance(y, tuple) else (y,))).backward()
    parts = block_activation_bytes(cfg, position, B, S, bf16=dtype == torch.bfloat16, impl="torch")
    assert measured == sum(parts.values()), (measured, parts)


def test_post_saves_as_much_as_pre_and_peri_more():
    """Post-like layers keep other tensors than pre layers (raw input, normalised sums) but as many bytes;
    peri keeps two more normalised tensors per layer (formula and measurement agree on both)."""
    sizes = {p: _model_saved_bytes(_config(p), torch.bfloat16, False) for p in ("pre", "post", "peri")}
    assert sizes["post"] == sizes["pre"] < sizes["peri"]


def test_triton_norm_blocks_equal_their_formula():
    """The Triton add+norm path (what --norm-impl auto runs on CUDA), interpreted on CPU in a fresh
    process: pre, post, peri, deepnorm, siamese (layers 1 and 2), residual-dual; RMSNorm in bf16 and
    LayerNorm in fp32."""
    pytest.importorskip("triton")
    import json
    import os
    import subprocess
    import sys

    here = os.path.dirname(os.path.abspath(__file__))
    repo = os.path.dirname(os.path.dirname(here))
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": repo + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, os.path.join(here, "triton_saved_bytes.py")], env=env, cwd=repo,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(results) == 18
    for case, (got, want) in results.items():
        assert got == want, (case, got, want)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: measures the allocator's peak on a GPU")
@pytest.mark.parametrize("recompute", [False, True], ids=["no-recompute", "recompute"])
@pytest.mark.parametrize("position", ["pre", "post", "peri", "mix"])
def test_cuda_peak_matches_formula(position, recompute):
    """bf16 on CUDA with the default kernels (Triton add+norm, flash attention): memory held after the
    forward (graph alive) is the formula's saved bytes; the forward+backward peak adds the recomputed
    block and transients (logits' gradients, parameter gradients), bounded here."""
    cfg = ModelConfig.from_preset("130m", norm_position=position, post_ln_layers=3 if position == "mix" else None,
                                  seq_length=256)
    b, s = 8, 256
    model = build_model(cfg, device="cuda").to(torch.bfloat16)
    if recompute:
        for block in model.layers:
            block.forward = functools.partial(checkpoint, block.forward, use_reentrant=False)
    tokens = torch.randint(0, cfg.vocab_size, (b, s + 1), device="cuda")
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    loss = token_losses(model(tokens[:, :-1]), tokens[:, 1:]).mean()
    held = torch.cuda.memory_allocated() - before
    predicted = activation_bytes(cfg, b, s, bf16=True, impl="triton", recompute=recompute)
    saved = predicted["total"] - predicted["recompute_peak"]
    assert abs(held - saved) <= 0.05 * saved, (held, predicted)
    torch.cuda.reset_peak_memory_stats()
    loss.backward()
    peak = torch.cuda.max_memory_allocated() - before
    fp32_logits = 4 * b * s * cfg.vocab_size  # the loss's backward makes up to three logits-sized fp32 tensors
    grads = 2 * sum(p.numel() for p in model.parameters())
    assert peak <= predicted["total"] + 3 * fp32_logits + 2 * grads, (peak, predicted)


TP_POSITIONS = ("pre", "post", "peri", "mix", "olmo2", "hybridnorm-star-dyt")


def _tp_config(position):
    zoo = dict(ZOO.get(position, {}))
    return _config(zoo.pop("norm_position", position), num_layers=2 if position not in ZOO else 3, **zoo)


def _tensor_parallel_job(rank, world_size, tmpdir):
    """Saved bytes of the blocks (hooks active only inside them) of a TP=2 model, with and without SP."""
    from megatron_mixln.parallel import apply_tensor_parallel, initialize_model_parallel

    state = initialize_model_parallel(2, 1)
    out = {}
    for position in TP_POSITIONS:
        for sp in (False, True):
            for dtype in (torch.float32, torch.bfloat16):
                cfg = _tp_config(position)
                torch.manual_seed(0)
                model = build_model(cfg)
                apply_tensor_parallel(model, state, sequence_parallel=sp)
                model.to(dtype)
                inside = [None]  # "blocks" or "embedding" (the learnable scale) while one of them runs
                for part, modules in (("blocks", model.layers), ("embedding", [model.embed_scale])):
                    for m in (m for m in modules if m is not None):
                        m.register_forward_pre_hook(lambda *a, part=part: inside.__setitem__(0, part))
                        m.register_forward_hook(lambda *a: inside.__setitem__(0, None))
                tokens = torch.randint(0, cfg.vocab_size, (B, S))
                params = {p.untyped_storage().data_ptr() for p in model.parameters()}
                seen = {"blocks": {}, "embedding": {}}

                def pack(t):
                    s = t.untyped_storage()
                    if inside[0] and s.nbytes() and s.data_ptr() not in params:
                        seen[inside[0]][s.data_ptr()] = s.nbytes()
                    return t

                with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                    model(tokens)
                out[(position, sp, str(dtype))] = {k: sum(v.values()) for k, v in seen.items()}
    return out


@pytest.mark.slow
def test_tensor_and_sequence_parallel_blocks_equal_their_formula():
    """TP=2 on 2 processes: heads and ffn split, norms on sequence shards under SP, the linears'
    inputs gathered whole (this project's SP saves the gathered input)."""
    from spawn_testlib import run_spawned

    measured = run_spawned(_tensor_parallel_job, 2)
    for rank in measured:
        for (position, sp, dtype), got in rank.items():
            cfg = _tp_config(position)
            want = sum(sum(block_activation_bytes(cfg, p, B, S, bf16=dtype == str(torch.bfloat16), impl="torch",
                                                  tp=2, sequence_parallel=sp).values()) for p in cfg.positions)
            assert got["blocks"] == want, (position, sp, dtype, got, want)
            # the embedding scale's saved input: this rank's sequence shard under SP
            embedding = activation_bytes(cfg, B, S, bf16=dtype == str(torch.bfloat16), impl="torch", tp=2,
                                         sequence_parallel=sp)["embedding"]
            assert got["embedding"] == embedding and (embedding > 0) == cfg.learnable_embedding_scale, \
                (position, sp, dtype, got, embedding)
