#!/usr/bin/env python
"""Fused residual-add + norm: time and achieved bandwidth of each implementation.

    python bench/norm_kernels.py               # hidden 512..8192 x tokens 4k..64k, RMSNorm and LayerNorm
    python bench/norm_kernels.py --quick       # hidden 1024, 4096 x 8k tokens
    python bench/norm_kernels.py --cpu-smoke   # no GPU: tiny shapes, Triton interpreter; proves the script runs

The case timed is Pre-LN's, the heaviest: s = r + x is carried on and normalised, both outputs get
gradients. Bandwidth counts the bytes that *must* move (the same ideal for every implementation, so
the "% copy" column is efficiency against the best possible):
    forward : read x, r, w (+b); write y, s, rstd (+mean)
    backward: read dy, ds, s, w, rstd (+mean); write dx (= the residual's grad: a = 1), and the
              fp32 dw (+db) partials, written once and read once by the final reduction
The reference is a large device-to-device copy (2 bytes moved per byte copied), measured here.
Targets (H100, hidden >= 2048): forward >= 85 %, forward+backward >= 60 % of copy bandwidth.
Times are medians of triton.testing.do_bench (CUDA events).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

ARGS = sys.argv[1:]
if "--cpu-smoke" in ARGS:
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported, or the kernels are built for a GPU

import torch  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from megatron_mixln.kernels.reference import add_norm_torch  # noqa: E402

TARGETS = {"fwd": 0.85, "fwd+bwd": 0.60}
TARGET_MIN_HIDDEN = 2048


def parse_args():
    p = argparse.ArgumentParser(allow_abbrev=False, description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small sweep: hidden 1024, 4096 x 8k tokens")
    p.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on CPU under the Triton interpreter")
    p.add_argument("--hidden", type=int, nargs="+", help="override the hidden sizes")
    p.add_argument("--tokens", type=int, nargs="+", help="override the token counts")
    p.add_argument("--kinds", nargs="+", default=["rmsnorm", "layernorm"], choices=["rmsnorm", "layernorm"])
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    p.add_argument("--impls", nargs="+", help="subset of: triton torch compile apex liger")
    return p.parse_args(ARGS)


# ---------------------------------------------------------------- implementations (name -> maker)

def make_triton(kind, n, device, dtype):
    from megatron_mixln.kernels.triton_add_norm import add_norm_triton

    return lambda x, r, w, b: add_norm_triton(x, r, w, b, 1e-6, kind=kind)


def make_torch(kind, n, device, dtype):
    return lambda x, r, w, b: add_norm_torch(x, r, w, b, 1e-6, kind=kind)


def make_compile(kind, n, device, dtype):
    torch._dynamo.reset()  # one shape per compiled function: no recompile limits, no dynamic shapes
    compiled = torch.compile(add_norm_torch, dynamic=False)
    return lambda x, r, w, b: compiled(x, r, w, b, 1e-6, kind=kind)


def make_apex(kind, n, device, dtype):
    """apex as usually used: the add in torch (rounded to the model dtype), then apex's fused norm."""
    from apex.normalization.fused_layer_norm import fused_layer_norm_affine, fused_rms_norm_affine

    def run(x, r, w, b):
        s = x + r
        if kind == "rmsnorm":
            return fused_rms_norm_affine(s, w, (n,), eps=1e-6), s
        return fused_layer_norm_affine(s, w, b, (n,), eps=1e-6), s

    return run


def make_liger(kind, n, device, dtype):
    """Liger's norm modules, with the add in torch."""
    if kind == "rmsnorm":
        from liger_kernel.transformers.rms_norm import LigerRMSNorm as Norm
    else:
        from liger_kernel.transformers.layer_norm import LigerLayerNorm as Norm
    module = Norm(n, eps=1e-6).to(device, dtype)

    def run(x, r, w, b):
        s = x + r
        params = {"weight": w} if b is None else {"weight": w, "bias": b}
        return torch.func.functional_call(module, params, (s,)), s

    return run


IMPLS = {"triton": make_triton, "torch": make_torch, "compile": make_compile, "apex": make_apex, "liger": make_liger}


# ---------------------------------------------------------------- measurement

def timer(device):
    """Median milliseconds of fn()."""
    if device.type == "cuda":
        import triton.testing

        return lambda fn: triton.testing.do_bench(fn, return_mode="median")

    def cpu_time(fn, reps=3):
        fn()
        times = []
        for _ in range(reps):
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1e3)
        return statistics.median(times)

    return cpu_time


def copy_bandwidth(device, measure, nbytes):
    """Bytes/s of a device-to-device copy (each byte read once and written once)."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = measure(lambda: dst.copy_(src))
    return 2 * nbytes / (ms * 1e-3)


def bytes_moved(m, n, elem, kind, programs):
    stats = (1 if kind == "rmsnorm" else 2) * 4 * m  # rstd (+ mean), fp32 per row
    params = (1 if kind == "rmsnorm" else 2) * elem * n
    fwd = 4 * elem * m * n + params + stats  # x, r in; y, s out
    partials = 2 * (1 if kind == "rmsnorm" else 2) * 4 * programs * n  # written, then read
    bwd = 4 * elem * m * n + elem * n + stats + partials + params  # dy, ds, s in; dx out; w in; dw (+db) out
    return fwd, fwd + bwd


def bench_one(make, kind, m, n, device, dtype, measure):
    fn = make(kind, n, device, dtype)
    g = torch.Generator(device=device).manual_seed(0)
    x, r, dy, ds = (torch.randn(m, n, device=device, dtype=dtype, generator=g) for _ in range(4))
    x.requires_grad_(True)
    r.requires_grad_(True)
    w = torch.ones(n, device=device, dtype=dtype, requires_grad=True)
    b = torch.zeros(n, device=device, dtype=dtype, requires_grad=True) if kind == "layernorm" else None
    inputs = [t for t in (x, r, w, b) if t is not None]

    def fwd():
        return fn(x, r, w, b)

    def fwd_bwd():
        y, s = fn(x, r, w, b)
        torch.autograd.grad((y, s), inputs, (dy, ds))  # returns grads: no accumulation into .grad

    fwd_bwd()  # compile outside the timing
    return measure(fwd), measure(fwd_bwd)


def main():
    args = parse_args()
    if args.cpu_smoke:
        device, dtype = torch.device("cpu"), torch.float32
        hiddens, tokens = args.hidden or [64, 100], args.tokens or [64]
        impls = args.impls or ["triton", "torch"]
        copy_nbytes = 64 << 20
    else:
        if not torch.cuda.is_available():
            sys.exit("bench/norm_kernels.py needs a CUDA GPU (use --cpu-smoke to check the script on CPU)")
        device = torch.device("cuda")
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
        quick_h, full_h = [1024, 4096], [512, 1024, 2048, 4096, 8192]
        quick_t, full_t = [8192], [4096, 16384, 65536]
        hiddens = args.hidden or (quick_h if args.quick else full_h)
        tokens = args.tokens or (quick_t if args.quick else full_t)
        impls = args.impls or list(IMPLS)
        copy_nbytes = 1 << 30

    measure = timer(device)
    copy_bw = copy_bandwidth(device, measure, copy_nbytes)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU (Triton interpreter: smoke test only)"
    print(f"device: {name}; dtype {dtype}; copy bandwidth {copy_bw / 1e9:.0f} GB/s")
    print(f"{'kind':9} {'hidden':>6} {'tokens':>6} {'impl':8} {'fwd ms':>8} {'GB/s':>6} {'%copy':>6}"
          f" {'f+b ms':>8} {'GB/s':>6} {'%copy':>6}")

    from megatron_mixln.kernels.add_norm_kernels import backward_programs, launch_config

    misses = []
    for kind in args.kinds:
        for n in hiddens:
            for m in tokens:
                programs = backward_programs(m, launch_config(n)[0], device)
                ideal = bytes_moved(m, n, torch.finfo(dtype).bits // 8, kind, programs)
                for impl in impls:
                    try:
                        times = bench_one(IMPLS[impl], kind, m, n, device, dtype, measure)
                    except (ImportError, ModuleNotFoundError) as e:
                        print(f"{kind:9} {n:6d} {m:6d} {impl:8} not installed ({e.name or e})")
                        continue
                    fracs = [b / (t * 1e-3) / copy_bw for b, t in zip(ideal, times)]
                    cells = "".join(f" {t:8.3f} {b / (t * 1e-3) / 1e9:6.0f} {f:6.0%}" for t, b, f in zip(times, ideal, fracs))
                    print(f"{kind:9} {n:6d} {m:6d} {impl:8}{cells}", flush=True)
                    if impl == "triton" and device.type == "cuda" and n >= TARGET_MIN_HIDDEN:
                        for (what, target), frac in zip(TARGETS.items(), fracs):
                            if frac < target:
                                misses.append(f"{kind} hidden {n} tokens {m}: {what} {frac:.0%} < {target:.0%}")
    if device.type == "cuda":
        print("targets (triton, hidden >= 2048): " + ("all met" if not misses else "missed:\n  " + "\n  ".join(misses)))


if __name__ == "__main__":
    main()
