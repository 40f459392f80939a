"""Compile the add+norm kernels ahead of time for an H100 (sm_90) on a machine with no GPU.

Triton's bundled ptxas turns them into cubins, so GPU-only compile errors (which the CPU
interpreter never sees) show up here; cuobjdump then reports registers and spill (stack) bytes.
    python tests/kernels/compile_sm90.py [N ...]      # run without TRITON_INTERPRET
"""
import os
import subprocess
import sys
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from megatron_mixln.kernels import add_norm_kernels as K

FWD_SIG = dict(X="*{t}", R="*{t}", W="*fp32", B="*fp32", Y="*{t}", S="*{t}", RSTD="*fp32", MEAN="*fp32",
               M="i32", N="i32", eps="fp32", residual_scale="fp32", out_scale="fp32")
BWD_SIG = dict(DY="*{t}", DRES="*{t}", S="*{t}", W="*fp32", RSTD="*fp32", MEAN="*fp32", DX="*{t}", DR="*{t}",
               DW_PARTIAL="*fp32", DB_PARTIAL="*fp32", M="i32", N="i32", rows_per_program="i32",
               residual_scale="fp32", out_scale="fp32")


def compile_kernel(kernel, sig, dtype, constexprs, num_warps, n=None):
    """As the JIT would specialise it: pointers 16-byte aligned, and N divisible by 16 when it is
    (that hint is what lets the loads vectorise)."""
    signature = {k: v.format(t=dtype) for k, v in sig.items()} | {k: "constexpr" for k in constexprs}
    aligned = [k for k, v in sig.items() if v.startswith("*") or (k == "N" and n is not None and n % 16 == 0)]
    attrs = {(kernel.arg_names.index(k),): [["tt.divisibility", 16]] for k in aligned}
    src = ASTSource(kernel, signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps})


def resources(compiled) -> str:
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        out = subprocess.run([cuobjdump, "-res-usage", f.name], capture_output=True, text=True).stdout
    fields = dict(item.split(":") for line in out.splitlines() if "REG:" in line for item in line.split()[:2])
    return f"{fields.get('REG', '?')} regs, {fields.get('STACK', '?')} B spilled"


def main(sizes, dtypes=("bf16",)):
    for n in sizes:
        block_m, block_n = K.launch_config(n)
        for dtype in dtypes:
            for is_rms in (True, False):
                flags = dict(IS_RMS=is_rms, HAS_BIAS=not is_rms, BLOCK_M=block_m, BLOCK_N=block_n)
                for num_warps in sorted({max(2, min(32, block_m * block_n // 32 // e)) for e in (16, 8, 4)}):
                    fwd = compile_kernel(K._add_norm_fwd_kernel, FWD_SIG, dtype, {**flags, "HAS_RESIDUAL": True}, num_warps, n)
                    bwd = compile_kernel(K._add_norm_bwd_kernel, BWD_SIG, dtype,
                                         {**flags, "HAS_DRES": True, "STORE_DR": True}, num_warps, n)
                    print(f"N={n:6d} {dtype} {'rms' if is_rms else 'ln '} warps={num_warps:2d}  "
                          f"fwd {resources(fwd)} | bwd {resources(bwd)}", flush=True)


if __name__ == "__main__":
    main([int(a) for a in sys.argv[1:]] or [100, 4096])
