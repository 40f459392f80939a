"""DeepSpeed checkpoints that continue the exact curve, and a `latest` pointer that only ever names a
complete checkpoint.

Layout of --save DIR:
    DIR/iter_0000100/           DeepSpeed's files (model, optimizer shards) + mixln_meta.json
    DIR/latest                  the tag of the newest *complete* checkpoint

Order of a save: every rank writes its shards (engine.save_checkpoint with save_latest=False, since
DeepSpeed would rewrite `latest` in place, before the other ranks are known to be done) -> barrier ->
rank 0 writes mixln_meta.json -> every rank hashes a share of the tag's files -> rank 0 writes
manifest.json (each file's size and xxh3-128, megatron_mixln.data.file_manifest), then `latest`
through a temp file + rename -> old tags pruned. A kill at any point leaves `latest` naming the
previous complete checkpoint, and a tag without a manifest is never taken for complete.

Loading verifies the manifest (sizes always, checksums unless --no-verify-checkpoint). Without
--tag a checkpoint that fails falls back to the newest older one that passes (with a warning
naming what failed); with --tag it is an error.

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
from megatron_mixln.data.file_manifest import (
    MANIFEST, assign, check_files, describe, list_files, read_manifest, write_manifest,
)
from megatron_mixln.data.fileio import atomic_write_text
from megatron_mixln.parallel.checkpoint_convert import (CONVERTED, PLAIN_WEIGHTS, is_converted_checkpoint,
                                                        is_plain_dir)
from megatron_mixln.parallel.universal import (UNIVERSAL, group_hyperparameters, repair_zero3_universal_load,
                                               universal_checkpoint_info)
from megatron_mixln.training.config import TrainingConfig, UsageError
from megatron_mixln.training.distributed import barrier, is_rank0

LATEST = "latest"
META = "mixln_meta.json"
TAG_RE = re.compile(r"^iter_(\d{7,})$")
# What makes two models incompatible (the shapes of their parameters, or what the layers compute).
SHAPE_FIELDS = ("vocab_size", "hidden_size", "ffn_hidden_size", "num_layers", "num_attention_heads",
                "num_query_groups", "normalization", "tie_embeddings", "final_norm")
# The norm zoo's (docs/norm-zoo.md), with the value a checkpoint written before them implies.
ZOO_FIELDS = {"qk_norm": "none", "qk_norm_per_head_gain": False, "dyt_bias": False,
              "hybrid_ffn_residual_after_norm": True}


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
                    tensor_model_parallel_size: int = 1, pipeline_model_parallel_size: int = 1,
                    data_fingerprint: dict | None = None) -> str:
    """Save tag iter_NNNNNNN (collective): shards, mixln_meta.json, manifest.json, then `latest`."""
    tag = tag_for(train_state.iteration)
    tag_dir = os.path.join(save_dir, tag)
    if is_rank0() and os.path.exists(os.path.join(tag_dir, MANIFEST)):
        os.remove(os.path.join(tag_dir, MANIFEST))  # re-saving a tag: it is incomplete until the new manifest
    client_state = {
        "universal_checkpoint_info": universal_checkpoint_info(engine.module),  # for ds_to_universal
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
                "pipeline_model_parallel_size": pipeline_model_parallel_size,
                "data_fingerprint": data_fingerprint}
        atomic_write_text(os.path.join(tag_dir, META), json.dumps(meta, indent=1, default=str))
    barrier()  # mixln_meta.json is on disk: the manifest covers it
    write_manifest_shared(tag_dir)
    if is_rank0():
        _write_latest(save_dir, tag)
        prune_checkpoints(save_dir, keep_last)
    barrier()
    return tag


def _all_ranks(local: list) -> list:
    """Concatenate a list over all ranks (just `local` without a process group)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return local
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, local)
    return [item for part in gathered for item in part]


def _rank_world() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def write_manifest_shared(tag_dir: str) -> None:
    """Every rank hashes its share of the files of tag_dir (collective); rank 0 writes manifest.json.
    Rank 0's listing is the one used (another node's view of a shared filesystem may lag)."""
    listing = [None]
    if is_rank0():
        files = list_files(tag_dir)
        listing = [(files, [os.path.getsize(os.path.join(tag_dir, f)) for f in files])]
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast_object_list(listing, src=0)
    files, sizes = listing[0]
    mine = [files[i] for i in assign(files, sizes, *_rank_world())]
    entries = dict(_all_ranks(list(describe(tag_dir, mine).items())))
    if is_rank0():
        write_manifest(tag_dir, entries)


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


def _tag_iteration(tag: str | None) -> int | None:
    m = TAG_RE.match(tag or "")
    return int(m[1]) if m else None


def candidate_tags(load_dir: str) -> list[str]:
    """Tags to try, newest first: the one `latest` names, then older iter_* tags (a tag newer than
    `latest` is a save that never finished). Without `latest`: every iter_* tag."""
    latest = read_latest(load_dir)
    tags = sorted((t for t in os.listdir(load_dir) if TAG_RE.match(t) and os.path.isdir(os.path.join(load_dir, t))),
                  key=_tag_iteration, reverse=True)
    if latest is None:
        return tags
    limit = _tag_iteration(latest)
    return [latest] + [t for t in tags if t != latest and (limit is None or _tag_iteration(t) < limit)]


def verify_checkpoint(load_dir: str, tag: str, checksums: bool = True) -> str | None:
    """What is wrong with checkpoint `tag` (None: complete and intact). Collective when a process
    group exists: each rank checks a share of the files, all ranks get the same answer."""
    tag_dir = os.path.join(load_dir, tag)
    if not os.path.isdir(tag_dir):
        return f"{tag_dir}: no such checkpoint directory"
    files = read_manifest(tag_dir)
    if files is None:
        if not checksums:
            return None if os.path.isfile(os.path.join(tag_dir, META)) else f"{tag}/{META}: missing"
        return (f"{tag}/{MANIFEST}: missing, so the save of {tag} did not finish (a checkpoint written before "
                "manifests existed loads with --no-verify-checkpoint)")
    names = sorted(files)
    mine = [names[i] for i in assign(names, [files[n]["size"] for n in names], *_rank_world())]
    problems = sorted(_all_ranks(check_files(tag_dir, files, mine, checksums)))
    if not problems and META not in files and not os.path.isfile(os.path.join(tag_dir, META)):
        problems = [f"{META}: missing"]
    return None if not problems else f"{tag}/" + f"; {tag}/".join(problems)


def inspect_checkpoint(load_dir: str, model_config: ModelConfig, tag: str | None = None,
                       checksums: bool = True) -> dict:
    """Check --load before anything is built: a complete, intact checkpoint of a model of this shape.

    Verifies the manifest (sizes; checksums when `checksums`) and reads the small JSON sidecar (no
    unpickling). Without `tag`, a checkpoint that fails falls back to the newest older one that
    passes; meta["skipped"] lists [tag, what failed] for each one passed over. Returns the sidecar's
    contents with meta["tag"] = the tag to load. Raises UsageError naming the directory, tag and file.
    """
    if not os.path.isdir(load_dir):
        raise UsageError(f"--load {load_dir}: no such directory")
    tags = [tag] if tag else candidate_tags(load_dir)
    if not tags and is_plain_dir(load_dir):  # tools/convert_checkpoint.py --to plain output
        raise UsageError(f"--load {load_dir} is a plain checkpoint ({PLAIN_WEIGHTS}); make it a DeepSpeed one "
                         "for this run's TP x PP layout first: " + convert_command(load_dir, "TP", "PP"))
    if not tags:
        raise UsageError(
            f"--load {load_dir}: no '{LATEST}' file, so no complete checkpoint (expected a directory written by --save)"
        )
    skipped = []
    for candidate in tags:
        problem = verify_checkpoint(load_dir, candidate, checksums)
        if problem is None:
            break
        if tag:
            raise UsageError(f"--load {load_dir} --tag {tag}: {problem}")
        skipped.append([candidate, problem])
    else:
        raise UsageError(f"--load {load_dir}: no usable checkpoint: " + " | ".join(p for _, p in skipped))
    with open(os.path.join(load_dir, candidate, META)) as fh:
        meta = json.load(fh)
    # `latest` is authoritative: a converted checkpoint carries the source's mixln_meta.json, whose
    # "tag" names the source tag, while the converter may have written it under another one.
    meta["tag"], meta["skipped"] = candidate, skipped
    saved, current = meta["model_config"], model_config.to_dict()
    diffs = [f"{k}: checkpoint {saved.get(k)!r} vs now {current[k]!r}" for k in SHAPE_FIELDS if saved.get(k) != current[k]]
    diffs += [f"{k}: checkpoint {saved.get(k, d)!r} vs now {current[k]!r}" for k, d in ZOO_FIELDS.items()
              if saved.get(k, d) != current[k]]
    saved_positions = ModelConfig(**saved).positions_str
    if saved_positions != model_config.positions_str:
        diffs.append(f"norm positions: checkpoint {saved_positions!r} vs now {model_config.positions_str!r}")
    if diffs:
        raise UsageError(f"--load {load_dir} ({candidate}) holds a different model: " + "; ".join(diffs))
    for marker, key in ((CONVERTED, "converted"), (UNIVERSAL, "universal")):
        path = os.path.join(load_dir, candidate, marker)
        if os.path.isfile(path):  # written by tools/convert_checkpoint.py: the layout it was converted to
            with open(path) as fh:
                meta[key] = json.load(fh)
    return meta


def fallback_warning(load_dir: str, meta: dict) -> str | None:
    """One line naming each checkpoint passed over and why, and the one used (None: none skipped)."""
    if not meta.get("skipped"):
        return None
    what = "; ".join(f"{tag} is unusable ({problem})" for tag, problem in meta["skipped"])
    return f"warning: --load {load_dir}: {what}; falling back to {meta['tag']}"


def check_resume_layout(meta: dict, load_dir: str, data_parallel_size: int, zero_stage: int,
                        tensor_model_parallel_size: int = 1, pipeline_model_parallel_size: int = 1,
                        bf16: bool | None = None) -> None:
    """DeepSpeed files are per TP/PP rank: the same TP x PP layout, or a converted checkpoint.
    ZeRO >= 1 shards optimizer (and for stage 3 model) states over data-parallel ranks: a
    checkpoint can only be resumed with the same stage and data-parallel size (a converted one,
    which has no optimizer states, with any). DeepSpeed's optimizer states (files and keys) also
    differ between fp32 and bf16 runs: the same --bf16 setting too. A universal checkpoint
    (tools/convert_checkpoint.py --to universal) resumes at any DP size and TP size, with ZeRO stage 1
    or 2 (from a stage 1/2 checkpoint) or 3 (from a stage 3 one)."""
    if meta.get("universal"):
        source_stage = (meta["universal"].get("source_layout") or {}).get("zero_stage")
        stages = (3,) if source_stage == 3 else (1, 2)
        if pipeline_model_parallel_size != 1 or zero_stage not in stages:
            raise UsageError(
                f"--load {load_dir} ({meta['tag']}) is a DeepSpeed universal checkpoint made from ZeRO stage "
                f"{source_stage}: it loads with --pipeline-model-parallel-size 1 and --zero-stage "
                f"{' or '.join(map(str, stages))} (this run has {pipeline_model_parallel_size} and {zero_stage})"
            )
        return
    layout = meta.get("converted") or meta
    saved_tp = layout.get("tensor_model_parallel_size", 1)
    saved_pp = layout.get("pipeline_model_parallel_size", 1)
    if (saved_tp, saved_pp) != (tensor_model_parallel_size, pipeline_model_parallel_size):
        raise UsageError(
            f"--load {load_dir} ({meta['tag']}) was written with --tensor-model-parallel-size {saved_tp} "
            f"--pipeline-model-parallel-size {saved_pp}; this run has {tensor_model_parallel_size} and "
            f"{pipeline_model_parallel_size}. Convert it first: "
            + convert_command(load_dir, tensor_model_parallel_size, pipeline_model_parallel_size)
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
            "same layout, or " + _reshape_advice(meta, load_dir, saved_stage, zero_stage, tensor_model_parallel_size,
                                                 pipeline_model_parallel_size)
        )


def _reshape_advice(meta: dict, load_dir: str, saved_stage: int, zero_stage: int, tp: int, pp: int) -> str:
    """How to load a ZeRO checkpoint at another data-parallel size or stage: DeepSpeed's universal format keeps
    the optimizer states (stage 1 <-> 2, or 3 -> 3); a weights-only conversion works for any layout (a stage-3
    checkpoint needs zero_to_fp32 for that)."""
    fresh = ("consolidate its partitioned weights with DeepSpeed's zero_to_fp32 (fresh optimizer moments)"
             if saved_stage == 3 else "with fresh optimizer moments, any data-parallel size and ZeRO stage: "
             + convert_command(load_dir, tp, pp))
    if (saved_stage == 3) != (zero_stage == 3):
        return fresh
    return (f"convert it, optimizer states kept: python tools/convert_checkpoint.py --input {load_dir} --tag "
            f"{meta['tag']} --output NEW_DIR --to universal, then --load NEW_DIR (or {fresh})")


def convert_command(load_dir: str, tp: int | str, pp: int | str) -> str:
    """The converter command that makes `load_dir` loadable at TP x PP, and the --load that follows it."""
    out = os.path.normpath(load_dir) + f"_tp{tp}pp{pp}"
    return (f"python tools/convert_checkpoint.py --input {load_dir} --output {out} --to deepspeed "
            f"--tp {tp} --pp {pp}, then --load {out}")


def load_checkpoint(engine, load_dir: str, tag: str) -> TrainState:
    """Restore model, optimizer, counters and this rank's RNG states. A checkpoint converted to
    another TP/PP layout has no optimizer states: the optimizer's moments then restart from zero
    (the LR is set from the schedule at every step, so it is right from the first resumed step)."""
    converted = is_converted_checkpoint(load_dir, tag)  # a universal one keeps its optimizer states
    # DeepSpeed's ZeRO-3 universal loader assumes one param group (parallel.universal.repair_zero3_universal_load)
    zero3_universal = engine.zero_optimization_stage() == 3 and os.path.isfile(os.path.join(load_dir, tag, UNIVERSAL))
    own_groups = group_hyperparameters(engine.optimizer) if zero3_universal else None
    path, client_state = engine.load_checkpoint(
        load_dir, tag=tag, load_optimizer_states=not converted, load_lr_scheduler_states=False
    )
    if path is None or not client_state or "mixln" not in client_state:
        raise UsageError(f"--load {load_dir}: DeepSpeed could not load checkpoint {tag!r}")
    if zero3_universal:
        repair_zero3_universal_load(engine.optimizer, os.path.join(load_dir, tag), own_groups)
    state = client_state["mixln"]
    rng_states = state["rng_states"]
    rank = dist.get_rank()
    if len(rng_states) == dist.get_world_size():
        set_rng_state(rng_states[rank])
    else:  # another world size: nothing to match rank to rank; reseed reproducibly instead
        seed = state["training_config"]["seed"] + state["train_state"]["iteration"] + rank
        random.seed(seed), np.random.seed(seed % 2**32), torch.manual_seed(seed)
    return TrainState(**state["train_state"])
