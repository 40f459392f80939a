"""Loading a checkpoint: verify it against its manifest, inspect its sidecar, fall back, restore.

Loading verifies the manifest (sizes always, checksums unless --no-verify-checkpoint). Without
--tag a checkpoint that fails falls back to the newest older one that passes (with a warning
naming what failed); with --tag it is an error.
"""
from __future__ import annotations

import json
import os

import torch.distributed as dist

from megatron_mixln.checkpoint.collective import all_ranks, rank_world
from megatron_mixln.checkpoint.compat import convert_command
from megatron_mixln.checkpoint.layout import (CONVERTED, LATEST, META, PLAIN_WEIGHTS, UNIVERSAL, is_plain_dir,
                                              list_tags, parse_tag, read_latest)
from megatron_mixln.checkpoint.meta import CLIENT_KEY, CheckpointMeta, TrainState
from megatron_mixln.checkpoint.rng import seed_everything, set_rng_state
from megatron_mixln.checkpoint.universal import group_hyperparameters, repair_zero3_universal_load
from megatron_mixln.errors import UsageError
from megatron_mixln.manifest import MANIFEST, assign, check_files, read_manifest
from megatron_mixln.model import ModelConfig

# What makes two models incompatible (the shapes of their parameters, or what the layers compute).
SHAPE_FIELDS = ("vocab_size", "hidden_size", "ffn_hidden_size", "num_layers", "num_attention_heads",
                "num_query_groups", "normalization", "tie_embeddings", "final_norm")
# The norm zoo's (docs/norm-zoo.md), with the value a checkpoint written before them implies.
ZOO_FIELDS = {"qk_norm": "none", "qk_norm_per_head_gain": False, "dyt_bias": False,
              "hybrid_ffn_residual_after_norm": True, "learnable_embedding_scale": False,
              "add_qkv_bias": False, "add_bias_linear": False, "add_output_layer_bias": False}


def _difference(field: str, saved, now) -> str:
    """One model difference, by its flag: `--hidden-size: checkpoint 32 vs now 64`; an on/off flag also
    says how to resume (`--add-qkv-bias: ... (resume it with --add-qkv-bias)`)."""
    flag = "--" + field.replace("_", "-")
    line = f"{flag}: checkpoint {saved!r} vs now {now!r}"
    if isinstance(saved, bool):
        line += f" (resume it with {flag if saved else '--no-' + flag[2:]})"
    return line



def candidate_tags(load_dir: str) -> list[str]:
    """Tags to try, newest first: the one `latest` names, then older iter_* tags (a tag newer than
    `latest` is a save that never finished). Without `latest`: every iter_* tag."""
    latest = read_latest(load_dir)
    tags = list_tags(load_dir)[::-1]
    if latest is None:
        return tags
    limit = parse_tag(latest)
    return [latest] + [t for t in tags if t != latest and (limit is None or parse_tag(t) < limit)]


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
    my_files = [names[i] for i in assign(names, [files[n]["size"] for n in names], *rank_world())]
    problems = sorted(all_ranks(check_files(tag_dir, files, my_files, checksums)))
    if not problems and META not in files and not os.path.isfile(os.path.join(tag_dir, META)):
        problems = [f"{META}: missing"]
    return None if not problems else f"{tag}/" + f"; {tag}/".join(problems)


def inspect_checkpoint(load_dir: str, model_config: ModelConfig, tag: str | None = None,
                       checksums: bool = True) -> dict:
    """Check --load before anything is built: a complete, intact checkpoint of a model of this shape.

    Verifies the manifest (sizes; checksums when `checksums`) and reads the small JSON sidecar (no
    unpickling). Without `tag`, a checkpoint that fails falls back to the newest older one that
    passes; meta["skipped"] lists [tag, what failed] for each one passed over. Returns the sidecar's
    fields (CheckpointMeta) with meta["tag"] = the tag to load, plus meta["converted"] /
    meta["universal"] for a converted checkpoint. Raises UsageError naming the directory, tag and file.
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
    meta = vars(CheckpointMeta.read(os.path.join(load_dir, candidate)))
    # `latest` is authoritative: a converted checkpoint carries the source's mixln_meta.json, whose
    # "tag" names the source tag, while the converter may have written it under another one.
    meta["tag"], meta["skipped"] = candidate, skipped
    saved, current = meta["model_config"], model_config.to_dict()
    diffs = [_difference(k, saved.get(k), current[k]) for k in SHAPE_FIELDS if saved.get(k) != current[k]]
    diffs += [_difference(k, saved.get(k, d), current[k]) for k, d in ZOO_FIELDS.items() if saved.get(k, d) != current[k]]
    saved_positions = ModelConfig(**saved).positions_str
    if saved_positions != model_config.positions_str:
        diffs.append(f"norm positions: checkpoint {saved_positions!r} vs now {model_config.positions_str!r}")
    if saved.get("vocab_size") != current["vocab_size"] and len(diffs) == 1:  # only the padding differs?
        diffs.append(f"the checkpoint's padded vocabulary travels with it: give --vocab-size {saved['vocab_size']} "
                     "(or drop --vocab-size when --tokenizer is given)")
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


def load_checkpoint(engine, load_dir: str, tag: str) -> tuple[TrainState, dict]:
    """Restore model, optimizer, counters and this rank's RNG states; returns the counters and the
    TrainingConfig dict the checkpoint was written with. A checkpoint converted to another TP/PP layout
    has no optimizer states: the optimizer's moments then restart from zero (the LR is set from the
    schedule at every step, so it is right from the first resumed step)."""
    converted = os.path.isfile(os.path.join(load_dir, tag, CONVERTED))  # a universal one keeps its optimizer states
    # DeepSpeed's ZeRO-3 universal loader assumes one param group (checkpoint.universal.repair_zero3_universal_load)
    zero3_universal = engine.zero_optimization_stage() == 3 and os.path.isfile(os.path.join(load_dir, tag, UNIVERSAL))
    own_groups = group_hyperparameters(engine.optimizer) if zero3_universal else None
    if converted:
        path, client_state = load_weights_only(engine, load_dir, tag)
    else:
        path, client_state = engine.load_checkpoint(load_dir, tag=tag, load_optimizer_states=True,
                                                    load_lr_scheduler_states=False)
    if path is None or not client_state or CLIENT_KEY not in client_state:
        raise UsageError(f"--load {load_dir}: DeepSpeed could not load checkpoint {tag!r}")
    if zero3_universal:
        repair_zero3_universal_load(engine.optimizer, os.path.join(load_dir, tag), own_groups)
    state = client_state[CLIENT_KEY]
    rng_states = state["rng_states"]
    rank = dist.get_rank()
    if len(rng_states) == dist.get_world_size():
        set_rng_state(rng_states[rank])
    else:  # another world size: nothing to match rank to rank; reseed reproducibly instead
        seed_everything(state["training_config"]["seed"] + state["train_state"]["iteration"] + rank)
    return TrainState(**state["train_state"]), dict(state.get("training_config") or {})


def load_weights_only(engine, load_dir: str, tag: str) -> tuple[str, dict]:
    """A checkpoint with weights and client state but no optimizer states (tools/convert_checkpoint.py
    --to deepspeed, tools/convert_from_hf.py), loaded the same way at every precision and ZeRO stage:
    this TP rank's module weights are copied into the module (under ZeRO-3 into the gathered, then
    re-partitioned parameters), then DeepSpeed's fp32 master weights / partitions are refreshed from
    them (`refresh_fp32_params`; in a bf16 run the masters are the loaded weights rounded to bf16).

    DeepSpeed's own load leaves the bf16 optimizer's fp32 masters (ZeRO-0) at the initialisation, which
    the first step copies back over the loaded weights, and under ZeRO-3 looks for per-partition files a
    weights-only checkpoint does not have (a bare AssertionError in its state_dict_factory). Pipeline
    engines (per-layer files) load through DeepSpeed, then refresh the same way. Returns (checkpoint
    path, client state). Raises UsageError when the file is missing or its weights do not fit the model."""
    import contextlib

    import deepspeed
    import torch

    from megatron_mixln.checkpoint.io import safe_load

    tag_dir = os.path.join(load_dir, tag)
    if any(name.startswith("layer_") for name in os.listdir(tag_dir)):  # the pipeline engine's layout
        path, client_state = engine.load_checkpoint(load_dir, tag=tag, load_optimizer_states=False,
                                                    load_lr_scheduler_states=False)
    else:
        mpu = getattr(engine, "mpu", None)
        tp_rank = mpu.get_model_parallel_rank() if mpu is not None else 0
        path = os.path.join(tag_dir, f"mp_rank_{tp_rank:02d}_model_states.pt")
        if not os.path.isfile(path):
            raise UsageError(f"--load {load_dir} ({tag}): {os.path.basename(path)} missing (tensor-parallel rank "
                             f"{tp_rank}'s weights)")
        checkpoint = safe_load(path, map_location="cpu")
        params = list(engine.module.parameters())
        gathered = (deepspeed.zero.GatheredParameters(params, modifier_rank=0)
                    if engine.zero_optimization_stage() == 3 else contextlib.nullcontext())
        with gathered, torch.no_grad():
            try:
                engine.module.load_state_dict(checkpoint["module"], strict=True)
            except RuntimeError as exc:
                raise UsageError(f"--load {load_dir} ({tag}): its weights do not fit this model: "
                                 f"{str(exc).splitlines()[0]}") from None
        client_state = {k: v for k, v in checkpoint.items() if k != "module"}
    refresh = getattr(engine.optimizer, "refresh_fp32_params", None)
    if refresh is not None:  # BF16_Optimizer (ZeRO-0), ZeRO-1/2 and ZeRO-3: masters <- the loaded weights
        refresh()
    return path, client_state
