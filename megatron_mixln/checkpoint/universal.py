"""DeepSpeed universal checkpoints: a ZeRO-1/2 checkpoint resharded for another DP size, ZeRO stage or TP size.

A ZeRO checkpoint stores each optimizer state (fp32 master weights, Adam's exp_avg and exp_avg_sq)
as flat partitions, one file per data-parallel rank and TP rank; DeepSpeed loads it only with the
same DP size. DeepSpeed's `deepspeed.checkpoint.ds_to_universal` turns it into one full tensor per
parameter and state (`<tag>/zero/<name>/{fp32,exp_avg,exp_avg_sq,step}.pt`); an engine whose config
has `"checkpoint": {"load_universal": true}` then cuts out its own TP slice and ZeRO partition
(`load_hp_checkpoint_state`). Merging TP slices needs to know how each parameter is split: the
trainer stores that in every checkpoint (`universal_checkpoint_info`, DeepSpeed's client-state key,
derived from megatron_mixln.parallel.sharding.tp_partition_dim): norms are replicated, o_proj and
down_proj are row-parallel (concatenated along dim 1), everything else along dim 0.

Limits: the source must be a ZeRO stage 1-3 checkpoint of the plain engine (PP = 1; pipeline
checkpoints change layout with tools/convert_checkpoint.py --to deepspeed, without optimizer states);
the target needs a ZeRO stage of the same family: 1 or 2 from a stage 1/2 source, 3 from a stage 3 one
(DeepSpeed loads universal checkpoints through its ZeRO optimizers, and its stage-3 universal
files -- zero/optimizer_state.pt, zero_pp_rank_* model states -- differ from the stage-1/2 ones).
The vocabulary is padded at config level (--make-vocab-size-divisible-by x TP), so the embedding
and head are plain dim-0 splits here.
"""
from __future__ import annotations

import os
import re
import shutil
from argparse import Namespace

import torch

from megatron_mixln.checkpoint.io import load_to_cpu
from megatron_mixln.checkpoint.layout import META, UNIVERSAL, resolve_tag, write_latest
from megatron_mixln.checkpoint.meta import CheckpointMeta
from megatron_mixln.fileio import atomic_write_json
from megatron_mixln.manifest import check_files, describe, list_files, read_manifest, write_manifest

UNIVERSAL_INFO_KEY = "universal_checkpoint_info"


def universal_checkpoint_info(module) -> dict:
    """DeepSpeed's UNIVERSAL_CHECKPOINT_INFO for our parameter names (regexes matched by re.match)."""
    from deepspeed.checkpoint.constants import (
        PARAMETER_WITH_ROW_PARALLELISM_PATTERNS, TP_REPLICATED_PARAMETER_PATTERNS, UNIVERSAL_CHECKPOINT_VERSION_KEY,
        UNIVERSAL_CHECKPOINT_VERSION_VALUE,
    )

    from megatron_mixln.parallel.sharding import tp_partition_dim

    replicated, row = [], []
    for name, _ in module.named_parameters():
        dim = tp_partition_dim(name)
        if dim is None:
            replicated.append(re.escape(name) + "$")
        elif dim == 1:
            row.append(re.escape(name) + "$")
    return {UNIVERSAL_CHECKPOINT_VERSION_KEY: UNIVERSAL_CHECKPOINT_VERSION_VALUE,
            TP_REPLICATED_PARAMETER_PATTERNS: replicated, PARAMETER_WITH_ROW_PARALLELISM_PATTERNS: row}


def _zero_stage_of_files(tag_dir: str) -> int | None:
    """The ZeRO stage a checkpoint was written with (the trainer's sidecar, else DeepSpeed's optimizer file)."""
    if os.path.isfile(os.path.join(tag_dir, META)):
        stage = CheckpointMeta.read(tag_dir).zero_stage
        if stage is not None:
            return int(stage)
    files = sorted(f for f in os.listdir(tag_dir) if f.endswith("optim_states.pt"))
    if not files:
        return None
    stage = (load_to_cpu(os.path.join(tag_dir, files[0])).get("ds_config") or {}).get("zero_optimization", {}).get("stage")
    return int(stage) if stage is not None else None


def convert_to_universal(src: str, dst: str, tag: str | None = None, out_tag: str | None = None,
                         workers: int = 1) -> dict:
    """Write DeepSpeed's universal form of checkpoint src/<tag> (default: `latest`) to dst/<out_tag>
    (default: the same tag), with the trainer's mixln_meta.json, a universal.json marker, a
    manifest and dst/latest. The source is first checked against its manifest (sizes, checksums).
    Raises ValueError for what it cannot convert (ZeRO-0, pipeline, a used tag, a damaged source)."""
    from deepspeed.checkpoint import ds_to_universal

    tag = resolve_tag(src, tag)
    out_tag = out_tag or tag
    src_dir, out_dir = os.path.join(src, tag), os.path.join(dst, out_tag)
    if not os.path.isdir(src_dir):
        raise ValueError(f"{src_dir}: no such checkpoint directory")
    if any(f.startswith("layer_") for f in os.listdir(src_dir)):
        raise ValueError(f"{src_dir}: a pipeline-engine checkpoint; universal conversion needs PP=1 "
                         "(change PP with --to deepspeed, which drops optimizer states)")
    stage = _zero_stage_of_files(src_dir)
    if stage not in (1, 2, 3):
        raise ValueError(f"{src_dir}: ZeRO stage {stage or 0} checkpoint; universal conversion reads ZeRO stage 1-3 "
                         "optimizer partitions (a ZeRO-0 checkpoint already holds full states: resume it directly)")
    files = read_manifest(src_dir)
    problems = check_files(src_dir, files, sorted(files)) if files is not None else []
    if problems:  # converting a torn or corrupted checkpoint would hide the damage behind a fresh manifest
        raise ValueError(f"{src_dir}: does not match its manifest: " + "; ".join(problems))
    if os.path.isdir(out_dir) and os.listdir(out_dir):
        raise ValueError(f"{out_dir}: already exists and is not empty; write to a new --output or --out-tag")
    tmp_dir = out_dir + ".tmp-universal"
    shutil.rmtree(tmp_dir, ignore_errors=True)
    args = Namespace(input_folder=src_dir, output_folder=tmp_dir, num_extract_workers=workers,
                     num_merge_workers=workers, keep_temp_folder=False, strict=True, inject_missing_state=True)
    ds_to_universal.main(args)
    meta_path = os.path.join(src_dir, META)
    layout = {}
    if os.path.isfile(meta_path):
        shutil.copy2(meta_path, os.path.join(tmp_dir, META))
        saved = CheckpointMeta.read(src_dir)
        layout = {k: getattr(saved, k) for k in ("data_parallel_size", "zero_stage", "tensor_model_parallel_size",
                                                 "pipeline_model_parallel_size", "bf16")}
    atomic_write_json(os.path.join(tmp_dir, UNIVERSAL), {"source": src, "source_tag": tag, "source_layout": layout,
                                                         "optimizer_states": True})
    write_manifest(tmp_dir, describe(tmp_dir, list_files(tmp_dir)))
    os.makedirs(dst, exist_ok=True)
    if os.path.isdir(out_dir):
        os.rmdir(out_dir)  # empty (checked above)
    os.replace(tmp_dir, out_dir)
    write_latest(dst, out_tag)
    return {"source": {"format": "deepspeed", "tag": tag, **layout},
            "target": {"format": "universal", "tag": out_tag, "dir": dst}}



def group_hyperparameters(optimizer) -> list[dict]:
    """Each param group's hyper-parameters (everything but "params"), in group order."""
    return [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]


def repair_zero3_universal_load(optimizer, tag_dir: str, own: list[dict]) -> None:
    """Undo the one-group assumptions of DeepSpeed's ZeRO-3 universal loader
    (`DeepSpeedZeroOptimizer_Stage3.load_hp_checkpoint_state_from_checkpoint_dir_stage3`); call it right
    after `engine.load_checkpoint` of a universal checkpoint under ZeRO-3. With two param groups
    (megatron_mixln.training.param_groups: decay, no decay) that loader

    - gives every group the hyper-parameters of the checkpoint's FIRST group, so the no-decay group (norm
      gains, biases) comes back with the decay group's weight_decay. Here group i gets group i's saved
      hyper-parameters (`tag_dir/zero/optimizer_state.pt`, "param_groups"), as DeepSpeed's ZeRO-1/2
      loader does (`ZeROOptimizer.load_hp_checkpoint_state_from_checkpoint_dir`); a checkpoint with
      another number of groups (other group rules) cannot be matched group to group, and the groups then
      keep this run's own hyper-parameters `own` (`group_hyperparameters` before the load);
    - stores ONE `step` tensor object as the Adam step of every sub-group; torch's Adam(W) increments it in
      place (`step_t += 1`) once per sub-group, so after the first resumed update the second group's bias
      correction runs one step ahead, and every update advances it by the number of groups. Each state
      gets its own copy here.

    `optimizer` is the ZeRO-3 optimizer (`engine.optimizer`). Raises FileNotFoundError when
    optimizer_state.pt is missing."""
    path = os.path.join(tag_dir, "zero", "optimizer_state.pt")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: missing (a ZeRO-3 universal checkpoint keeps its param groups there)")
    saved = load_to_cpu(path).get("param_groups") or []
    groups = optimizer.param_groups
    source = saved if len(saved) == len(groups) else own
    for group, values in zip(groups, source):
        group.update({k: v for k, v in values.items() if k != "params"})
    for state in optimizer.state.values():
        if torch.is_tensor(state.get("step")):
            state["step"] = state["step"].clone()
