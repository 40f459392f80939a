#!/usr/bin/env python
"""Training-step throughput of this stack's model against transformers' LlamaForCausalLM.

    python bench/throughput.py --hidden-size 256 --ffn-hidden-size 688 --num-layers 4 \
        --num-attention-heads 4 --vocab-size 8000 --micro-batch-size 8 --seq-length 256 \
        --dtype fp32 bf16 --compile off on                       # the CPU table in bench/RESULTS.md
    python bench/throughput.py --preset 1b --dtype bf16 --compile on --micro-batch-size 8 \
        --seq-length 2048 --json out.json                        # one GPU

One step = forward, backward and optimizer step (AdamW, lr 1e-3, fused=True) on a fixed
(micro-batch, seq-length) batch of random tokens. Both models have the same shape (LLaMA: SwiGLU,
RoPE, untied head, SDPA attention) and the same optimizer; `transformers` runs its own loss
(`labels=`), as the seed's training loop does, this stack runs the trainer's (fp32 cross entropy).
The two are built in one process and timed alternately (A B, B A, ...) so machine load hits both:
`--repeats` rounds of `--steps` steps each after `--warmup` untimed steps (compilation happens
there). Reported: median tokens/s per device and its spread (min-max over the rounds), the ratio of
medians (this stack / transformers), MFU = tokens/s x FLOPs/token / peak with the trainer's FLOPs
count (`megatron_mixln.training.flops`: 6 N + 12 L d T per token) -- only where the peak is known
(a listed GPU, or `--peak-tflops`; "n/a" on CPU) -- and peak memory of one step after the warm-up:
the model's parameters and AdamW state plus the step's peak growth over them (gradients,
activations, temporaries): CUDA allocator figures on a GPU, resident-set growth on CPU (Linux).

`--dtype bf16` is torch.autocast mixed precision by default (fp32 weights and optimizer);
`--bf16-mode cast` casts both models to bf16 (bf16 weights, as the Mix-LN reference loop, and as
DeepSpeed's bf16 mode computes, which adds fp32 master weights). `--compile on` compiles this stack
the way the trainer does (`apply_compile`: each block; `compile_loss`) and transformers' model as a
whole (`--hf-compile off` keeps it eager: the seed's loop). Bad arguments are reported before
anything is built.
"""
from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import statistics
import sys
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from megatron_mixln.model import ModelConfig, build_model  # noqa: E402
from megatron_mixln.model.presets import PRESETS  # noqa: E402
from megatron_mixln.training.flops import flops_per_token, gpu_peak_tflops  # noqa: E402
from megatron_mixln.training.loss import token_losses  # noqa: E402
from megatron_mixln.training.model_setup import apply_compile, compile_loss  # noqa: E402

IMPLS = ("mixln", "hf")
SDPA_BACKENDS = ("auto", "flash", "efficient", "cudnn", "math")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    shape = p.add_argument_group("shape (a preset, or the fields; a field given overrides the preset)")
    shape.add_argument("--preset", choices=sorted(PRESETS), help="model shape from megatron_mixln.model.presets")
    for name in ("hidden-size", "ffn-hidden-size", "num-layers", "num-attention-heads", "num-query-groups"):
        shape.add_argument(f"--{name}", type=int)
    shape.add_argument("--vocab-size", type=int, default=32000)
    p.add_argument("--presets", nargs="+", choices=sorted(PRESETS), help="several presets, one table row each")
    p.add_argument("--norm-position", nargs="+", default=["pre"], help="one or more (mix, pre, post, peri, lns, ...)")
    p.add_argument("--micro-batch-size", type=int, default=8)
    p.add_argument("--seq-length", type=int, default=256)
    p.add_argument("--dtype", nargs="+", default=["fp32"], choices=["fp32", "bf16"])
    p.add_argument("--bf16-mode", default="autocast", choices=["autocast", "cast"])
    p.add_argument("--compile", nargs="+", default=["off"], choices=["off", "on"])
    p.add_argument("--hf-compile", default="same", choices=["same", "off"],
                   help="same: compile transformers' model too when --compile on; off: keep it eager (the seed's loop)")
    p.add_argument("--compile-scope", default="blocks", choices=["blocks", "model"],
                   help="this stack under --compile on: each block (the trainer's way) or the whole model")
    p.add_argument("--cross-block-fusion", default="on", choices=["on", "off"],
                   help="this stack's cross-block residual-add fusion (ModelConfig.cross_block_fusion)")
    p.add_argument("--norm-impl", default="auto", help="this stack's add+norm implementation (auto, torch, triton, apex)")
    p.add_argument("--impls", nargs="+", default=list(IMPLS), choices=IMPLS)
    p.add_argument("--repeats", type=int, default=5, help="timed rounds per model (alternating)")
    p.add_argument("--steps", type=int, default=2, help="training steps per round")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per model before the rounds")
    p.add_argument("--clock", default="wall", choices=["wall", "cpu"],
                   help="wall: elapsed time; cpu: this process's CPU time (all threads) -- steadier on a shared "
                        "CPU machine with OMP_NUM_THREADS=1, meaningless on a GPU")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1...")
    p.add_argument("--sdpa-backend", default="auto", choices=SDPA_BACKENDS,
                   help="pin scaled_dot_product_attention to one backend (CUDA); auto lets PyTorch choose")
    p.add_argument("--peak-tflops", type=float, help="device peak TFLOP/s for MFU (default: known GPUs only)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON ('-' for stdout)")
    args = p.parse_args(argv)
    check_args(p, args)
    return args


def check_args(p, args) -> None:
    for name in ("micro_batch_size", "seq_length", "repeats", "steps", "vocab_size"):
        if getattr(args, name) <= 0:
            p.error(f"--{name.replace('_', '-')}: must be a positive integer, got {getattr(args, name)}")
    if args.warmup < 0:
        p.error(f"--warmup: must be >= 0, got {args.warmup}")
    if args.clock == "cpu" and resolve_device(args.device).type == "cuda":
        p.error("--clock cpu: only for --device cpu (GPU work does not show in the CPU clock)")
    if args.peak_tflops is not None and args.peak_tflops <= 0:
        p.error(f"--peak-tflops: must be positive, got {args.peak_tflops}")
    if args.preset and args.presets:
        p.error("--preset and --presets: give one of them")
    if not (args.preset or args.presets) and None in (args.hidden_size, args.ffn_hidden_size, args.num_layers,
                                                      args.num_attention_heads):
        p.error("shape: give --preset/--presets, or all of --hidden-size --ffn-hidden-size --num-layers "
                "--num-attention-heads")
    for spec in shapes(args):  # builds every ModelConfig: bad positions/shapes fail here, before any timing
        for position in args.norm_position:
            try:
                model_config(args, spec, position)
            except ValueError as e:
                p.error(str(e))
    device = resolve_device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error(f"--device {args.device}: CUDA is not available on this machine")
    if "hf" in args.impls:
        try:
            import transformers  # noqa: F401
        except ImportError:
            p.error("--impls hf: needs the transformers package (pip install transformers)")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def shapes(args) -> list[dict]:
    """[{name, hidden_size, ffn_hidden_size, num_layers, num_attention_heads, num_query_groups}]"""
    out = []
    for name in args.presets or [args.preset]:
        spec = dict(PRESETS[name]) if name else {}
        for key in ("hidden_size", "ffn_hidden_size", "num_layers", "num_attention_heads", "num_query_groups"):
            if getattr(args, key) is not None:
                spec[key] = getattr(args, key)
        spec.setdefault("num_query_groups", spec["num_attention_heads"])
        out.append({"name": name or f"h{spec['hidden_size']}-l{spec['num_layers']}", **spec})
    return out


def model_config(args, spec: dict, position: str) -> ModelConfig:
    fields = {k: v for k, v in spec.items() if k != "name"}
    return ModelConfig(**fields, vocab_size=args.vocab_size, seq_length=args.seq_length, norm_position=position,
                       norm_impl=args.norm_impl, cross_block_fusion=args.cross_block_fusion == "on")


# ---------------------------------------------------------------- the two models and their steps

def build_mixln(cfg: ModelConfig, device):
    return build_model(cfg, device=device)


def build_hf(cfg: ModelConfig, device):
    from transformers import LlamaConfig, LlamaForCausalLM

    hf_cfg = LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.ffn_hidden_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_query_groups, max_position_embeddings=cfg.seq_length,
        rms_norm_eps=cfg.norm_epsilon, rope_theta=cfg.rotary_base, tie_word_embeddings=False,
        attention_bias=False, mlp_bias=False, use_cache=False,
    )
    hf_cfg._attn_implementation = "sdpa"
    with torch.device(device):
        return LlamaForCausalLM(hf_cfg)


def make_step(impl: str, model, optimizer, tokens, labels, autocast_dtype, compiled: bool = False):
    """One training step: forward, loss, backward, optimizer step, zero grads (the trainer's, for mixln:
    with `compiled`, its loss compiled as `compile_loss` does)."""
    device_type = tokens.device.type
    amp = (torch.autocast(device_type, dtype=autocast_dtype) if autocast_dtype is not None
           else contextlib.nullcontext())

    if impl == "mixln":
        token_loss_fn = compile_loss(token_losses) if compiled else token_losses

        def loss_fn():
            return token_loss_fn(model(tokens), labels).mean()
    else:
        def loss_fn():
            return model(input_ids=tokens, labels=tokens).loss

    def step():
        with amp:
            loss = loss_fn()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    return step


def make_optimizer(model, device):
    # fused=True: one kernel over all parameters instead of a foreach loop (CUDA, and CPU since torch 2.4)
    return torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0, fused=True)


def prepare(impl: str, cfg: ModelConfig, args, dtype: str, compile_on: bool, device):
    """-> (model, optimizer, step function) for one implementation."""
    torch.manual_seed(args.seed)
    model = build_mixln(cfg, device) if impl == "mixln" else build_hf(cfg, device)
    autocast_dtype = None
    if dtype == "bf16":
        if args.bf16_mode == "cast":
            model.to(torch.bfloat16)
        else:
            autocast_dtype = torch.bfloat16
    if compile_on:
        if impl == "mixln":
            apply_compile(model, whole_model=args.compile_scope == "model")
        elif args.hf_compile == "same":
            model.compile()
    model.train()
    optimizer = make_optimizer(model, device)
    g = torch.Generator(device="cpu").manual_seed(args.seed + 1)
    tokens = torch.randint(0, cfg.vocab_size, (args.micro_batch_size, args.seq_length), generator=g).to(device)
    labels = torch.randint(0, cfg.vocab_size, (args.micro_batch_size, args.seq_length), generator=g).to(device)
    return model, optimizer, make_step(impl, model, optimizer, tokens, labels, autocast_dtype, compile_on)


def sdpa_context(backend: str):
    if backend == "auto":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel({"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
                        "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}[backend])


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------- peak memory

def _proc_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise OSError(f"/proc/self/status has no {field}")


def step_peak_growth(step, device) -> int | None:
    """Bytes a training step allocates at its peak over what was allocated before it (grads and
    activations; on CPU the resident-set growth, peak reset through /proc/self/clear_refs), or None
    where it cannot be measured."""
    if device.type == "cuda":
        sync(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        sync(device)
        return torch.cuda.max_memory_allocated(device) - base
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak resident set size (VmHWM) to the current one
        base = _proc_kib("VmRSS")
        step()
        return (_proc_kib("VmHWM") - base) * 1024
    except OSError:
        return None


def persistent_bytes(model, optimizer) -> int:
    """Parameters and optimizer state (AdamW: step, exp_avg, exp_avg_sq), resident between steps."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    for st in optimizer.state.values():
        total += sum(t.numel() * t.element_size() for t in st.values() if torch.is_tensor(t))
    return total


# ---------------------------------------------------------------- one table row

def measure(args, spec: dict, position: str, dtype: str, compile_on: bool, device) -> dict:
    cfg = model_config(args, spec, position)
    tokens_per_step = args.micro_batch_size * args.seq_length
    n_params = None
    runs = {}
    for impl in args.impls:
        model, optimizer, step = prepare(impl, cfg, args, dtype, compile_on, device)
        if impl == "mixln":
            n_params = sum(p.numel() for p in model.parameters())
        runs[impl] = {"model": model, "optimizer": optimizer, "step": step, "times": [], "memory": None}
    with sdpa_context(args.sdpa_backend):
        for impl, run in runs.items():  # warm-up (compilation, optimizer state), then one step's memory
            for _ in range(args.warmup):
                run["step"]()
            if not args.no_memory:
                growth = step_peak_growth(run["step"], device)
                if growth is not None:
                    run["memory"] = persistent_bytes(run["model"], run["optimizer"]) + growth
        order = list(runs)
        clock = time.process_time if args.clock == "cpu" else time.perf_counter
        for r in range(args.repeats):
            for impl in (order if r % 2 == 0 else order[::-1]):
                sync(device)
                t0 = clock()
                for _ in range(args.steps):
                    runs[impl]["step"]()
                sync(device)
                runs[impl]["times"].append(clock() - t0)
    embed = cfg.vocab_size * cfg.hidden_size
    fpt = flops_per_token(n_params or 0, embed, cfg.num_layers, cfg.hidden_size, cfg.seq_length)
    peak = args.peak_tflops or (gpu_peak_tflops(dtype == "bf16") if device.type == "cuda" else None)
    row = {"shape": spec["name"], "norm_position": cfg.positions_str, "dtype": dtype, "compile": compile_on,
           "micro_batch_size": args.micro_batch_size, "seq_length": args.seq_length,
           "parameters": n_params, "flops_per_token": fpt, "peak_tflops": peak, "results": {}}
    for impl, run in runs.items():
        rates = [args.steps * tokens_per_step / t for t in run["times"]]
        med = statistics.median(rates)
        row["results"][impl] = {
            "tokens_per_s": med, "tokens_per_s_min": min(rates), "tokens_per_s_max": max(rates),
            "tokens_per_s_rounds": rates, "step_ms": 1e3 * tokens_per_step / med,
            "mfu": med * fpt / (peak * 1e12) if peak else None,
            "peak_memory_gib": run["memory"] / 2**30 if run["memory"] is not None else None,
        }
    if "mixln" in runs and "hf" in runs:
        row["ratio"] = row["results"]["mixln"]["tokens_per_s"] / row["results"]["hf"]["tokens_per_s"]
        paired = [h / m for m, h in zip(runs["mixln"]["times"], runs["hf"]["times"])]  # same round, same load
        row["ratio_rounds"] = paired
    for run in runs.values():
        run.clear()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def fmt_row(row) -> list[str]:
    cells = []
    for impl in ("mixln", "hf"):
        r = row["results"].get(impl)
        if r is None:
            cells += ["", "", ""]
            continue
        cells.append(f"{r['tokens_per_s']:,.0f} ({r['tokens_per_s_min']:,.0f}-{r['tokens_per_s_max']:,.0f})")
        cells.append(f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a")
        cells.append(f"{r['peak_memory_gib']:.2f}" if r["peak_memory_gib"] is not None else "n/a")
    ratio = row.get("ratio")
    if ratio is not None:
        paired = row["ratio_rounds"]
        cells.append(f"{ratio:.2f} ({min(paired):.2f}-{max(paired):.2f})")
    else:
        cells.append("")
    return [row["shape"], row["norm_position"], row["dtype"], "on" if row["compile"] else "off"] + cells


HEADER = ["shape", "positions", "dtype", "compile", "mixln tok/s (min-max)", "mixln MFU", "mixln GiB",
          "hf tok/s (min-max)", "hf MFU", "hf GiB", "ratio (per-round min-max)"]


def print_table(rows, file=None):
    file = file or sys.stdout
    print("| " + " | ".join(HEADER) + " |", file=file)
    print("|" + "---|" * len(HEADER), file=file)
    for row in rows:
        print("| " + " | ".join(fmt_row(row)) + " |", file=file)


def describe_device(device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (torch {torch.__version__}, CUDA {torch.version.cuda})"
    return f"CPU, {torch.get_num_threads()} threads (torch {torch.__version__})"


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    device = resolve_device(args.device)
    print(f"# device: {describe_device(device)}; load average {os.getloadavg()[0]:.2f}", flush=True)
    print(f"# micro-batch {args.micro_batch_size} x seq {args.seq_length}, vocab {args.vocab_size}, AdamW; "
          f"{args.repeats} rounds x {args.steps} steps after {args.warmup} warm-up, alternating; "
          f"bf16 = {args.bf16_mode}, sdpa {args.sdpa_backend}, cross-block fusion {args.cross_block_fusion}, "
          f"{args.clock} clock, compile scope {args.compile_scope}, transformers compiled: {args.hf_compile}",
          flush=True)
    rows = []
    for spec, position, dtype, comp in itertools.product(shapes(args), args.norm_position, args.dtype, args.compile):
        row = measure(args, spec, position, dtype, comp == "on", device)
        rows.append(row)
        print("  " + " | ".join(fmt_row(row)), file=sys.stderr, flush=True)
    print_table(rows)
    if args.json:
        payload = {"device": describe_device(device), "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
                   "command": "python bench/throughput.py " + " ".join(argv),
                   "load_average": os.getloadavg(), "rows": rows}
        if args.json == "-":
            json.dump(payload, sys.stdout, indent=1)
            print()
        else:
            tmp = args.json + ".tmp"
            with open(tmp, "w") as f:
                json.dump(payload, f, indent=1)
            os.replace(tmp, args.json)
    return rows


if __name__ == "__main__":
    main()
