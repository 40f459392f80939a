"""Checkpoints across parallel layouts: DeepSpeed TP/PP checkpoints <-> one plain state dict.

Formats (all read with `torch.load(..., weights_only=True)`):

plain      <dir>/model.safetensors (the `Transformer`'s own state-dict keys, full tensors)
           <dir>/config.json       (`ModelConfig.to_dict()`)
           <dir>/trainer_state.pt  (optional: DeepSpeed's counters, LR scheduler and client state)

deepspeed, plain engine (PP=1; `deepspeed.initialize(model=Transformer, mpu=state.mpu)`):
           <dir>/<tag>/mp_rank_{tp:02d}_model_states.pt   {"module": TP shard, plain keys; counters...}

deepspeed, pipeline engine (`build_pipeline_module`):
           <dir>/<tag>/layer_{idx:02d}-model_{tp:02d}-model_states.pt   one file per pipeline layer
               (0: embedding, 1..L: blocks, L+1: final norm + head) and TP rank; it does not depend on
               how layers were split into stages, so PP changes only the metadata files:
           <dir>/<tag>/mp_rank_{pp*tp+tp_rank:02d}_model_states.pt  {"module": None; counters...}
           <dir>/latest   (the tag)

ZeRO optimizer states (`zero_pp_rank_*_optim_states.pt`) and non-ZeRO optimizer states are NOT
converted: load the result with `engine.load_checkpoint(dir, load_optimizer_states=False)` and the
run continues with the same weights, step counters, LR-scheduler state and client state, but with
fresh optimizer moments (Adam's m and v restart from zero). ZeRO-3 checkpoints hold partitioned
weights: consolidate them with DeepSpeed's zero_to_fp32 first.
"""
from __future__ import annotations

import json
import os
import re

import torch

from megatron_mixln.checkpoint.io import load_to_cpu
from megatron_mixln.checkpoint.layout import (CONVERTED, MANIFEST, PLAIN_CONFIG, PLAIN_TRAINER_STATE, PLAIN_WEIGHTS,
                                              UNIVERSAL, resolve_tag, write_latest)
from megatron_mixln.fileio import atomic_open, atomic_write_json, atomic_write_text, atomic_write_with
from megatron_mixln.manifest import describe, list_files, write_manifest
from megatron_mixln.parallel.sharding import merge_tp, split_tp
from megatron_mixln.parallel.state_dicts import pipeline_layer_prefix

SIDECARS = "sidecar_files"  # metadata key: {file name: text} of JSON files found next to DeepSpeed's
_LAYER_FILE = re.compile(r"layer_(\d+)(?:-model_(\d+))?-model_states\.pt$")
_MP_FILE = re.compile(r"mp_rank_(\d+)_model_states\.pt$")
# DeepSpeed's own per-layout entries of mp_rank files; everything else (counters, LR scheduler,
# client state such as the trainer's iteration or model_config) is carried over unchanged.
_LAYOUT_KEYS = ("module", "optimizer", "param_shapes", "frozen_param_shapes", "shared_params",
                "frozen_param_fragments", "buffer_names", "mp_world_size", "dp_world_size",
                "checkpoint_parallel_dimensions")


# ---------------------------------------------------------------- reading DeepSpeed layouts


def _metadata(mp_file: dict) -> dict:
    stage = (mp_file.get("ds_config") or {}).get("zero_optimization", {}).get("stage", 0)
    if int(stage) == 3:
        raise ValueError(
            "ZeRO-3 checkpoint: weights are partitioned; consolidate them with DeepSpeed's zero_to_fp32 first"
        )
    return {k: v for k, v in mp_file.items() if k not in _LAYOUT_KEYS}


def read_sidecars(path: str) -> dict:
    """Small JSON files next to DeepSpeed's (e.g. the trainer's mixln_meta.json), carried over verbatim."""
    out = {}
    for name in sorted(os.listdir(path)):
        if name.endswith(".json") and name not in (CONVERTED, MANIFEST, UNIVERSAL) and os.path.getsize(os.path.join(path, name)) < 1 << 20:
            with open(os.path.join(path, name)) as f:
                out[name] = f.read()
    return out


def read_deepspeed_checkpoint(ckpt_dir: str, tag: str | None = None) -> tuple[dict, dict, dict]:
    """-> (plain full state dict, metadata, source layout {"engine", "tp", "pp"})."""
    tag = resolve_tag(ckpt_dir, tag)
    path = os.path.join(ckpt_dir, tag)
    mp_files = sorted(f for f in os.listdir(path) if _MP_FILE.match(f)) if os.path.isdir(path) else []
    if not mp_files:
        raise FileNotFoundError(f"{path}: no DeepSpeed mp_rank_*_model_states.pt files")
    meta_file = load_to_cpu(os.path.join(path, mp_files[0]))
    meta = _metadata(meta_file)
    meta[SIDECARS] = read_sidecars(path)
    layer_files = [f for f in os.listdir(path) if _LAYER_FILE.match(f)]
    if layer_files:
        by_layer: dict[int, dict[int, str]] = {}
        for f in layer_files:
            idx, tp_rank = _LAYER_FILE.match(f).groups()
            by_layer.setdefault(int(idx), {})[int(tp_rank or 0)] = f
        num_layers = max(by_layer) - 1
        tp = len(by_layer[0])
        complete = sorted(by_layer) == list(range(num_layers + 2))
        if not complete or any(sorted(v) != list(range(tp)) for v in by_layer.values()):
            raise ValueError(f"{path}: incomplete set of pipeline layer files")
        plain = {}
        for idx in range(num_layers + 2):
            merged = merge_tp([load_to_cpu(os.path.join(path, by_layer[idx][r])) for r in range(tp)])
            prefix = pipeline_layer_prefix(idx, num_layers)
            plain.update({prefix + k: v for k, v in merged.items()})
        return plain, meta, {"engine": "pipeline", "tp": tp, "pp": len(mp_files) // tp}
    modules = [meta_file["module"]] + [load_to_cpu(os.path.join(path, f))["module"] for f in mp_files[1:]]
    if any(m is None for m in modules):
        raise ValueError(f"{path}: mp_rank files hold no module and there are no layer files")
    return merge_tp(modules), meta, {"engine": "plain", "tp": len(mp_files), "pp": 1}


# ---------------------------------------------------------------- writing DeepSpeed layouts


def _check_target(plain: dict, config, tp: int, pp: int, engine: str) -> int:
    from megatron_mixln.parallel.pipeline import check_pipeline_config
    from megatron_mixln.parallel.tensor_parallel import check_tensor_parallel_config

    if engine not in ("plain", "pipeline"):
        raise ValueError(f"engine: unknown {engine!r}; allowed: plain, pipeline")
    if engine == "plain" and pp != 1:
        raise ValueError("the plain DeepSpeed engine has no pipeline stages: use engine='pipeline' for PP > 1")
    num_layers = 1 + max(int(k.split(".")[1]) for k in plain if k.startswith("layers."))
    if config is not None:
        if config.num_layers != num_layers:
            raise ValueError(f"config has num_layers={config.num_layers} but the state dict has {num_layers}")
        check_tensor_parallel_config(config, tp, False)
        check_pipeline_config(config, pp, "parameters")
    elif tp > 1:
        raise ValueError("splitting over TP needs the ModelConfig (to check heads/kv-heads divide TP): pass --config")
    return num_layers


def write_deepspeed_checkpoint(plain: dict, out_dir: str, tag: str, tp: int, pp: int, engine: str,
                               metadata: dict | None = None, config=None, dp: int = 1) -> None:
    """Split a plain state dict into DeepSpeed's on-disk layout for a TP x PP run (see module doc)."""
    num_layers = _check_target(plain, config, tp, pp, engine)
    path = os.path.join(out_dir, tag)
    if os.path.isdir(path) and os.listdir(path):
        # Another layout's files would stay next to ours (readers pick layer files over mp_rank files).
        raise ValueError(f"{path}: already exists and is not empty; write to a new --output or --out-tag")
    os.makedirs(path, exist_ok=True)
    shards = [split_tp(plain, tp, r) for r in range(tp)]
    meta = dict(metadata or {})
    sidecars = meta.pop(SIDECARS, {})
    meta.setdefault("global_steps", 0)
    meta.setdefault("global_samples", 0)
    meta.setdefault("skipped_steps", 0)
    meta.setdefault("lr_scheduler", None)
    common = dict(meta, optimizer=None, param_shapes=None, frozen_param_shapes=None, shared_params={},
                  frozen_param_fragments=None, buffer_names=[], dp_world_size=dp, mp_world_size=tp * pp,
                  checkpoint_parallel_dimensions={"pp_degree": pp, "tp_degree": tp, "dp_degree": dp})
    if engine == "plain":
        for r in range(tp):
            torch.save(dict(common, module=shards[r]), os.path.join(path, f"mp_rank_{r:02d}_model_states.pt"))
    else:
        for r in range(tp):
            for idx in range(num_layers + 2):
                prefix = pipeline_layer_prefix(idx, num_layers)
                layer = _layer_entries(shards[r], prefix, idx, num_layers)
                torch.save(layer, os.path.join(path, f"layer_{idx:02d}-model_{r:02d}-model_states.pt"))
        for mp_rank in range(tp * pp):
            torch.save(dict(common, module=None), os.path.join(path, f"mp_rank_{mp_rank:02d}_model_states.pt"))
    for name, text in sidecars.items():
        atomic_write_text(os.path.join(path, name), text)
    atomic_write_json(os.path.join(path, CONVERTED), {"tensor_model_parallel_size": tp, "pipeline_model_parallel_size": pp,
                                                      "engine": engine, "optimizer_states": False})
    write_manifest(path, describe(path, list_files(path)))  # last: the trainer verifies it on load
    write_latest(out_dir, tag)


def _layer_entries(shard: dict, prefix: str, idx: int, num_layers: int) -> dict:
    if idx == 0:
        names = ("embed.", "embed_scale.")
    elif idx == num_layers + 1:
        names = ("final_norm.", "lm_head.")
    else:
        names = (prefix,)
    out = {}
    for key, value in shard.items():
        if key.startswith(names):
            out[key[len(prefix):]] = value
    return out


# ---------------------------------------------------------------- plain format


def save_plain(plain: dict, out_dir: str, config=None, metadata: dict | None = None) -> None:
    from safetensors.torch import save_file

    os.makedirs(out_dir, exist_ok=True)
    tensors = {k: v.detach().contiguous().clone() for k, v in plain.items()}
    if "lm_head.weight" in tensors and "embed.weight" in tensors and config is not None and config.tie_embeddings:
        del tensors["lm_head.weight"]  # tied: stored once (safetensors refuses shared storage)
    # Each file is written under a temporary name and renamed: a kill never leaves a torn file.
    atomic_write_with(os.path.join(out_dir, PLAIN_WEIGHTS), lambda tmp: save_file(tensors, tmp))
    if config is not None:
        atomic_write_json(os.path.join(out_dir, PLAIN_CONFIG), config.to_dict())
    if metadata:
        with atomic_open(os.path.join(out_dir, PLAIN_TRAINER_STATE)) as fh:
            torch.save(metadata, fh)


def load_plain(in_dir: str) -> tuple[dict, object, dict]:
    """-> (state dict, ModelConfig or None, metadata)."""
    from safetensors.torch import load_file

    from megatron_mixln.model import ModelConfig

    plain = load_file(os.path.join(in_dir, PLAIN_WEIGHTS))
    config = None
    cfg_path = os.path.join(in_dir, PLAIN_CONFIG)
    if os.path.isfile(cfg_path):
        with open(cfg_path) as f:
            config = ModelConfig(**json.load(f))
        if config.tie_embeddings and "lm_head.weight" not in plain:
            plain["lm_head.weight"] = plain["embed.weight"]
    state_path = os.path.join(in_dir, PLAIN_TRAINER_STATE)
    metadata = load_to_cpu(state_path) if os.path.isfile(state_path) else {}
    return plain, config, metadata


def config_from_metadata(metadata: dict):
    """The ModelConfig a trainer stored in its client state (client_state["mixln"]["model_config"] as
    megatron_mixln.training does, or client_state["model_config"]), if any."""
    from megatron_mixln.model import ModelConfig

    for holder in (metadata.get("mixln"), metadata):
        cfg = holder.get("model_config") if isinstance(holder, dict) else None
        if isinstance(cfg, dict):
            return ModelConfig(**cfg)
    return None


# ---------------------------------------------------------------- one call


def convert(src: str, dst: str, to: str = "plain", tp: int = 1, pp: int = 1, engine: str | None = None,
            tag: str | None = None, out_tag: str | None = None, config=None, dp: int = 1) -> dict:
    """Convert `src` (plain dir or DeepSpeed dir) into `dst`: to="plain" or to="deepspeed" with a
    TP x PP layout (engine "pipeline" when pp > 1, else "plain" unless given), or to="rmsnorm": a
    LayerNorm Pre-LN model as the RMSNorm one with the same outputs, written in the plain format
    (checkpoint/rmsnorm.py: β folded into linear biases; UsageError when the model is not one).
    Returns a summary."""
    from megatron_mixln.checkpoint.reader import read_full_state_dict  # reads ZeRO-3 runs too

    plain, src_config, metadata, source = read_full_state_dict(src, tag)
    src_tag = source.get("tag", "converted")
    config = config if config is not None else src_config
    if to == "rmsnorm":
        from megatron_mixln.checkpoint.rmsnorm import to_rmsnorm

        plain, config, metadata = to_rmsnorm(plain, config, metadata, f"--input {src}")
    if to in ("plain", "rmsnorm"):
        save_plain(plain, dst, config, metadata)
    elif to == "deepspeed":
        engine = engine or ("pipeline" if pp > 1 else "plain")
        write_deepspeed_checkpoint(plain, dst, out_tag or src_tag, tp, pp, engine, metadata, config, dp)
    else:
        raise ValueError(f"to: unknown {to!r}; allowed: plain, deepspeed, rmsnorm")
    return {"source": source, "target": {"format": to, "tp": tp, "pp": pp, "engine": engine},
            "tensors": len(plain), "parameters": sum(v.numel() for k, v in plain.items())}
