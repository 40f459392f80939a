"""The DeepSpeed config: a JSON from ds_configs/ whose batch, clipping, precision and optimizer
fields are filled from the flags, so the two can never disagree.

A field the JSON sets to a concrete value different from the flag's is an error naming the field and
both values; "auto" (or leaving it out) means "take the flag's". The LR schedule is ours (see
schedule.py), so a JSON "scheduler" section is refused.

ZeRO bucket sizes set to "auto" are derived from the model's hidden size h, with the formulas
DeepSpeed documents for its Hugging Face integration ("auto" values of zero_optimization):
reduce_bucket_size = h*h, stage3_prefetch_bucket_size = 0.9*h*h (rounded down),
stage3_param_persistence_threshold = 10*h (see `zero_auto_sizes`).
"""
from __future__ import annotations

import copy
import json
import math
import os

from megatron_mixln.errors import UsageError
from megatron_mixln.training.config import TrainingConfig

_UNSET = object()


def load_ds_json(path: str) -> dict:
    if not os.path.isfile(path):
        raise UsageError(f"--deepspeed-config {path}: no such file")
    try:
        with open(path) as fh:
            data = json.load(fh)
    except (OSError, json.JSONDecodeError) as exc:
        raise UsageError(f"--deepspeed-config {path}: not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise UsageError(f"--deepspeed-config {path}: expected a JSON object")
    return data


def _same(a, b) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b or a == b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return math.isclose(a, b, rel_tol=1e-12, abs_tol=0.0)
    return a == b


def _agree(section: dict, key: str, value, where: str, flag: str, source: str):
    """Set section[key] = value unless the file already holds a different concrete value."""
    current = section.get(key, _UNSET)
    if current is not _UNSET and current != "auto" and not _same(current, value):
        raise UsageError(
            f"{source}: \"{where}\" is {current!r} but {flag} gives {value!r}; make them agree or set it to \"auto\""
        )
    section[key] = value


def _section(cfg: dict, key: str, source: str) -> dict:
    value = cfg.setdefault(key, {})
    if not isinstance(value, dict):
        raise UsageError(f"{source}: \"{key}\" must be an object, got {value!r}")
    return value


def zero_stage_of(ds_config: dict) -> int:
    return int(ds_config.get("zero_optimization", {}).get("stage", 0))


def optimizer_offloaded(ds_config: dict) -> bool:
    offload = ds_config.get("zero_optimization", {}).get("offload_optimizer") or {}
    return offload.get("device", "none") not in ("none", None)


def zero_auto_sizes(hidden_size: int) -> dict[str, int]:
    """The "auto" ZeRO sizes for a model of width `hidden_size` (elements, not bytes): one bucket holds
    about one h x h weight matrix; parameters under 10*h elements (norm gains, biases) stay unpartitioned."""
    return {"reduce_bucket_size": hidden_size * hidden_size,
            "stage3_prefetch_bucket_size": int(0.9 * hidden_size * hidden_size),
            "stage3_param_persistence_threshold": 10 * hidden_size}


def fill_zero_auto(zero: dict, hidden_size: int | None, source: str) -> dict:
    """Replace "auto" ZeRO sizes in a zero_optimization section (in place) by `zero_auto_sizes`.

    Raises UsageError when a size is "auto" and no hidden size is known, or a key other than these is "auto".
    """
    sizes = zero_auto_sizes(hidden_size) if hidden_size else {}
    for key, value in list(zero.items()):
        if value != "auto":
            continue
        if key not in zero_auto_sizes(1):
            raise UsageError(f"{source}: \"zero_optimization.{key}\" cannot be \"auto\" (only "
                             f"{', '.join(zero_auto_sizes(1))} are derived from the hidden size)")
        if not sizes:
            raise UsageError(f"{source}: \"zero_optimization.{key}\" is \"auto\" but no hidden size was given")
        zero[key] = sizes[key]
    return zero


def build_ds_config(cfg: TrainingConfig, global_batch_size: int, gradient_accumulation_steps: int,
                    hidden_size: int | None = None) -> dict:
    """The filled DeepSpeed config; `hidden_size` resolves "auto" ZeRO bucket sizes (see zero_auto_sizes)."""
    source = f"--deepspeed-config {cfg.deepspeed_config}" if cfg.deepspeed_config else "DeepSpeed config"
    ds = copy.deepcopy(load_ds_json(cfg.deepspeed_config)) if cfg.deepspeed_config else {}

    _agree(ds, "train_batch_size", global_batch_size, "train_batch_size", "--global-batch-size", source)
    _agree(ds, "train_micro_batch_size_per_gpu", cfg.micro_batch_size, "train_micro_batch_size_per_gpu",
           "--micro-batch-size", source)
    _agree(ds, "gradient_accumulation_steps", gradient_accumulation_steps, "gradient_accumulation_steps",
           "--global-batch-size / (--micro-batch-size x data-parallel size)", source)
    _agree(ds, "gradient_clipping", float(cfg.clip_grad), "gradient_clipping", "--clip-grad", source)

    zero = _section(ds, "zero_optimization", source)
    if cfg.zero_stage is not None:
        _agree(zero, "stage", cfg.zero_stage, "zero_optimization.stage", "--zero-stage", source)
    zero.setdefault("stage", 0)
    fill_zero_auto(zero, hidden_size, source)
    if zero["stage"] not in (0, 1, 2, 3):
        raise UsageError(f"{source}: \"zero_optimization.stage\" must be 0-3, got {zero['stage']!r}")
    if cfg.pipeline_model_parallel_size > 1 and zero["stage"] > 1:
        raise UsageError(
            f"{source}: ZeRO stage {zero['stage']} with --pipeline-model-parallel-size "
            f"{cfg.pipeline_model_parallel_size}: DeepSpeed's pipeline engine supports ZeRO stage 0 or 1 only"
        )

    if ds.get("fp16", {}).get("enabled") not in (None, False, "auto"):
        raise UsageError(f"{source}: fp16 is not supported (use --bf16)")
    ds.setdefault("fp16", {})["enabled"] = False
    _agree(_section(ds, "bf16", source), "enabled", bool(cfg.bf16), "bf16.enabled", "--bf16", source)

    if "scheduler" in ds:
        raise UsageError(
            f"{source}: has a \"scheduler\" section; the LR schedule comes from --lr, --min-lr, "
            "--lr-warmup-iters and --lr-decay-style: remove it"
        )
    _fill_optimizer(ds, cfg, source)
    ds.setdefault("steps_per_print", 2**31 - 1)  # we print our own progress lines
    ds.setdefault("wall_clock_breakdown", False)
    return ds


def _fill_optimizer(ds: dict, cfg: TrainingConfig, source: str) -> None:
    opt = _section(ds, "optimizer", source)
    params = opt.setdefault("params", {})
    if "type" in opt and opt["type"] != "auto":
        kind = str(opt["type"]).lower()
        if kind not in ("adam", "adamw"):
            raise UsageError(f"{source}: \"optimizer.type\" {opt['type']!r} is not supported; use Adam or AdamW")
        # DeepSpeed's "Adam" is AdamW unless adam_w_mode is false.
        effective = "adamw" if kind == "adamw" or params.get("adam_w_mode", True) else "adam"
        if effective != cfg.optimizer:
            raise UsageError(
                f"{source}: \"optimizer.type\" {opt['type']!r} (adam_w_mode={params.get('adam_w_mode', True)}) "
                f"means {effective} but --optimizer gives {cfg.optimizer!r}; make them agree or set it to \"auto\""
            )
    opt["type"] = "AdamW" if cfg.optimizer == "adamw" else "Adam"
    _agree(params, "adam_w_mode", cfg.optimizer == "adamw", "optimizer.params.adam_w_mode", "--optimizer", source)
    _agree(params, "lr", cfg.lr, "optimizer.params.lr", "--lr", source)
    _agree(params, "betas", [cfg.adam_beta1, cfg.adam_beta2], "optimizer.params.betas",
           "--adam-beta1/--adam-beta2", source)
    _agree(params, "eps", cfg.adam_eps, "optimizer.params.eps", "--adam-eps", source)
    _agree(params, "weight_decay", cfg.weight_decay, "optimizer.params.weight_decay", "--weight-decay", source)
    torch_adam = cfg.torch_adam
    if torch_adam is None:
        torch_adam = params.get("torch_adam", not optimizer_offloaded(ds))
    _agree(params, "torch_adam", bool(torch_adam), "optimizer.params.torch_adam", "--torch-adam", source)
    if torch_adam and optimizer_offloaded(ds):
        ds.setdefault("zero_force_ds_cpu_optimizer", False)  # torch Adam on the offloaded states is allowed
    if torch_adam and not optimizer_offloaded(ds) and _cuda_available():
        params.setdefault("fused", True)  # torch's one-kernel AdamW on GPU (DeepSpeed passes the key through)


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()
