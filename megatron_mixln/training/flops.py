"""Model FLOPs utilisation: (6 N + 12 L d T) FLOPs per token for forward+backward (PaLM's count:
N = parameters that do matmuls -- all but the input embedding, which is a lookup; 12 L d T the
attention scores and weighted sum over T positions) over the devices' peak.
"""
from __future__ import annotations

import torch

# Dense peak TFLOP/s per device: (bf16, fp32/tf32). Public spec sheets, SXM parts.
_GPU_PEAKS = {
    "H200": (989.0, 494.7),
    "H100": (989.0, 494.7),
    "H800": (989.0, 494.7),
    "A100": (312.0, 156.0),
    "A800": (312.0, 156.0),
    "L40S": (362.0, 183.0),
    "A10": (125.0, 62.5),
    "V100": (125.0, 15.7),
}


def gpu_peak_tflops(bf16: bool, name: str | None = None) -> float | None:
    """Dense peak TFLOP/s of a listed GPU (`name`, default: the current CUDA device), else None."""
    if name is None:
        if not torch.cuda.is_available():
            return None
        name = torch.cuda.get_device_name()
    for key, (p_bf16, p_fp32) in _GPU_PEAKS.items():
        if key in name.upper():
            return p_bf16 if bf16 else p_fp32
    return None


def default_peak_tflops(bf16: bool) -> float | None:
    """Dense peak TFLOP/s of this CUDA device when it is one of the listed GPUs, else None: MFU is
    then not reported (a CPU has no published peak to divide by; pass --peak-tflops to get one)."""
    return gpu_peak_tflops(bf16)


def flops_per_token(num_params: int, embedding_params: int, num_layers: int, hidden_size: int, seq_length: int) -> float:
    return 6.0 * (num_params - embedding_params) + 12.0 * num_layers * hidden_size * seq_length


def memory_gib() -> float:
    """Peak accelerator memory (CUDA) or peak resident memory of this process (CPU)."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
