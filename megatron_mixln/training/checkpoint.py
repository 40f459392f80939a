"""DeepSpeed checkpoints that continue the exact curve, and a `latest` pointer that only ever names a
complete checkpoint.

Layout of --save DIR:
    DIR/iter_0000100/           DeepSpeed's files (model, optimizer shards) + mixln_meta.json
    DIR/latest                  the tag of the newest *complete* checkpoint

Order of a save: every rank writes its shards (engine.save_checkpoint with save_latest=False, since
DeepSpeed would rewrite `latest` in place, before the other ranks are known to be done) -> barrier ->
rank 0 writes mixln_meta.json, then `latest` through a temp file + rename -> old tags pruned. A kill at
any point leaves `latest` naming the previous complete checkpoint.

Client state (in DeepSpeed's model-states file) holds the iteration, consumed samples, counters,
both configs and the RNG states of python, numpy and torch of every rank.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.distributed as dist

from megatron_mixln.model import ModelConfig
from megatron_mixln.data.fileio import atomic_write_text
from megatron_mixln.parallel.checkpoint_convert import CONVERTED, is_converted_checkpoint
from megatron_mixln.training.config import TrainingConfig, UsageError
from megatron_mixln.training.distributed import barrier, is_rank0

LATEST = "latest"
META = "mixln_meta.json"
TAG_RE = re.compile(r"^iter_(\d{7,})$")
# What makes two models incompatible (the shapes of their parameters, or what the layers compute).
SHAPE_FIELDS = ("vocab_size", "hidden_size", "ffn_hidden_size", "num_layers", "num_attention_heads",
                "num_query_groups", "normalization", "tie_embeddings", "final_norm")


@dataclass
class TrainState:
    iteration: int = 0  # optimizer steps taken (applied or skipped)
    consumed_samples: int = 0  # training samples read, over all data-parallel ranks
    skipped_steps: int = 0  # non-finite steps whose update was dropped
    bad_steps_in_a_row: int = 0
    consumed_tokens: int = 0  # target tokens trained on (padding excluded), over all data-parallel ranks
    rollbacks: int = 0  # --rollback-on-spike reloads so far
    lr_scale: float = 1.0  # product of --rollback-lr-factor over the rollbacks


def tag_for(iteration: int) -> str:
    return f"iter_{iteration:07d}"


# --- RNG states: plain python types and tensors only, so weights_only loading accepts them ---

def rng_state() -> dict:
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(gauss)],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _gather_rng_states() -> list[dict]:
    states = [None] * dist.get_world_size()
    dist.all_gather_object(states, rng_state())
    return states


# --- save ---

def save_checkpoint(engine, save_dir: str, train_state: TrainState, model_config: ModelConfig,
                    cfg: TrainingConfig, keep_last: int, data_parallel_size: int | None = None,
                    tensor_model_parallel_size: int = 1, pipeline_model_parallel_size: int = 1) -> str:
    tag = tag_for(train_state.iteration)
    client_state = {
        "mixln": {
            "format": 1,
            "train_state": asdict(train_state),
            "model_config": model_config.to_dict(),
            "training_config": cfg.to_dict(),
            "rng_states": _gather_rng_states(),
        }
    }
    engine.save_checkpoint(save_dir, tag=tag, client_state=client_state, save_latest=False)
    barrier()  # every rank's shards are on disk
    if is_rank0():
        meta = {"tag": tag, "train_state": asdict(train_state), "model_config": model_config.to_dict(),
                "world_size": dist.get_world_size(), "data_parallel_size": data_parallel_size,
                "zero_stage": engine.zero_optimization_stage(), "bf16": engine.bfloat16_enabled(),
                "bf16_pure": bool(cfg.bf16_pure),
                "tensor_model_parallel_size": tensor_model_parallel_size,
                "pipeline_model_parallel_size": pipeline_model_parallel_size}
        atomic_write_text(os.path.join(save_dir, tag, META), json.dumps(meta, indent=1, default=str))
        _write_latest(save_dir, tag)
        prune_checkpoints(save_dir, keep_last)
    barrier()
    return tag


def _write_latest(save_dir: str, tag: str) -> None:
    atomic_write_text(os.path.join(save_dir, LATEST), tag)


def prune_checkpoints(save_dir: str, keep_last: int) -> None:
    """Delete all but the newest `keep_last` tags (never the one `latest` names)."""
    if keep_last <= 0:
        return
    latest = read_latest(save_dir)
    tags = sorted((t for t in os.listdir(save_dir) if TAG_RE.match(t)), key=lambda t: int(TAG_RE.match(t)[1]))
    for tag in tags[:-keep_last]:
        if tag != latest:
            shutil.rmtree(os.path.join(save_dir, tag), ignore_errors=True)


# --- load ---

def read_latest(load_dir: str) -> str | None:
    path = os.path.join(load_dir, LATEST)
    if not os.path.isfile(path):
        return None
    with open(path) as fh:
        return fh.read().strip() or None


def inspect_checkpoint(load_dir: str, model_config: ModelConfig) -> dict:
    """Check --load before anything is built: a complete checkpoint of a model of this shape.

    Reads only the small JSON sidecar (no unpickling). Returns its contents.
    """
    if not os.path.isdir(load_dir):
        raise UsageError(f"--load {load_dir}: no such directory")
    tag = read_latest(load_dir)
    if tag is None:
        raise UsageError(
            f"--load {load_dir}: no '{LATEST}' file, so no complete checkpoint (expected a directory written by --save)"
        )
    meta_path = os.path.join(load_dir, tag, META)
    if not os.path.isfile(meta_path):
        raise UsageError(f"--load {load_dir}: '{LATEST}' names {tag!r} but {meta_path} is missing")
    with open(meta_path) as fh:
        meta = json.load(fh)
    saved, current = meta["model_config"], model_config.to_dict()
    diffs = [f"{k}: checkpoint {saved.get(k)!r} vs now {current[k]!r}" for k in SHAPE_FIELDS if saved.get(k) != current[k]]
    saved_positions = ModelConfig(**saved).positions_str
    if saved_positions != model_config.positions_str:
        diffs.append(f"norm positions: checkpoint {saved_positions!r} vs now {model_config.positions_str!r}")
    if diffs:
        raise UsageError(f"--load {load_dir} ({tag}) holds a different model: " + "; ".join(diffs))
    converted = os.path.join(load_dir, tag, CONVERTED)
    if os.path.isfile(converted):  # written by tools/convert_checkpoint.py: its layout, no optimizer states
        with open(converted) as fh:
            meta["converted"] = json.load(fh)
    return meta


def check_resume_layout(meta: dict, load_dir: str, data_parallel_size: int, zero_stage: int,
                        tensor_model_parallel_size: int = 1, pipeline_model_parallel_size: int = 1,
                        bf16: bool | None = None) -> None:
    """DeepSpeed files are per TP/PP rank: the same TP x PP layout, or a converted checkpoint.
    ZeRO >= 1 shards optimizer (and for stage 3 model) states over data-parallel ranks: a
    checkpoint can only be resumed with the same stage and data-parallel size (a converted one,
    which has no optimizer states, with any). DeepSpeed's optimizer states (files and keys) also
    differ between fp32 and bf16 runs: the same --bf16 setting too."""
    layout = meta.get("converted") or meta
    saved_tp = layout.get("tensor_model_parallel_size", 1)
    saved_pp = layout.get("pipeline_model_parallel_size", 1)
    if (saved_tp, saved_pp) != (tensor_model_parallel_size, pipeline_model_parallel_size):
        raise UsageError(
            f"--load {load_dir} ({meta['tag']}) was written with --tensor-model-parallel-size {saved_tp} "
            f"--pipeline-model-parallel-size {saved_pp}; this run has {tensor_model_parallel_size} and "
            f"{pipeline_model_parallel_size}. Convert it first: python tools/convert_checkpoint.py --input "
            f"{load_dir} --output NEW_DIR --to deepspeed --tp {tensor_model_parallel_size} "
            f"--pp {pipeline_model_parallel_size}"
        )
    if meta.get("converted"):
        return
    saved_bf16 = meta.get("bf16")
    if bf16 is not None and saved_bf16 is not None and saved_bf16 != bf16:
        raise UsageError(
            f"--load {load_dir} ({meta['tag']}) was written {'with' if saved_bf16 else 'without'} --bf16; this "
            f"run has {'--bf16' if bf16 else 'no --bf16'}, and DeepSpeed's optimizer states differ between the "
            "two. Resume with the same precision"
        )
    saved_dp, saved_stage = meta.get("data_parallel_size"), meta.get("zero_stage")
    if saved_stage is None or saved_dp is None:
        return
    if (saved_stage or zero_stage) and (saved_dp, saved_stage) != (data_parallel_size, zero_stage):
        raise UsageError(
            f"--load {load_dir} ({meta['tag']}) was written with ZeRO stage {saved_stage} on {saved_dp} "
            f"data-parallel ranks; this run has ZeRO stage {zero_stage} on {data_parallel_size}. Resume with the "
            "same layout (or convert it with DeepSpeed's universal-checkpoint tools)"
        )


def load_checkpoint(engine, load_dir: str, tag: str) -> TrainState:
    """Restore model, optimizer, counters and this rank's RNG states. A checkpoint converted to
    another TP/PP layout has no optimizer states: the optimizer's moments then restart from zero
    (the LR is set from the schedule at every step, so it is right from the first resumed step)."""
    converted = is_converted_checkpoint(load_dir, tag)
    path, client_state = engine.load_checkpoint(
        load_dir, tag=tag, load_optimizer_states=not converted, load_lr_scheduler_states=False
    )
    if path is None or not client_state or "mixln" not in client_state:
        raise UsageError(f"--load {load_dir}: DeepSpeed could not load checkpoint {tag!r}")
    state = client_state["mixln"]
    rng_states = state["rng_states"]
    rank = dist.get_rank()
    if len(rng_states) == dist.get_world_size():
        set_rng_state(rng_states[rank])
    else:  # another world size: nothing to match rank to rank; reseed reproducibly instead
        seed = state["training_config"]["seed"] + state["train_state"]["iteration"] + rank
        random.seed(seed), np.random.seed(seed % 2**32), torch.manual_seed(seed)
    return TrainState(**state["train_state"])
