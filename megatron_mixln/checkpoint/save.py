"""Saving a DeepSpeed checkpoint so that `latest` only ever names a complete one.

Order of a save: every rank writes its shards (engine.save_checkpoint with save_latest=False, since
DeepSpeed would rewrite `latest` in place, before the other ranks are known to be done) -> barrier ->
rank 0 writes mixln_meta.json -> every rank hashes a share of the tag's files -> rank 0 writes
manifest.json (each file's size and xxh3-128, megatron_mixln.manifest), then `latest` through a temp
file + rename -> old tags pruned. A kill at any point leaves `latest` naming the previous complete
checkpoint, and a tag without a manifest is never taken for complete.
"""
from __future__ import annotations

import os
import shutil

import torch.distributed as dist

from megatron_mixln.checkpoint.collective import all_ranks, barrier, is_rank0, rank_world
from megatron_mixln.checkpoint.layout import list_tags, read_latest, tag_for, write_latest
from megatron_mixln.checkpoint.meta import CLIENT_KEY, CheckpointMeta, TrainState, client_state, lr_schedule_of
from megatron_mixln.checkpoint.rng import gather_rng_states
from megatron_mixln.checkpoint.universal import UNIVERSAL_INFO_KEY, universal_checkpoint_info
from megatron_mixln.manifest import MANIFEST, assign, describe, list_files, write_manifest


def save_checkpoint(engine, save_dir: str, train_state: TrainState, model_config, cfg, keep_last: int,
                    data_parallel_size: int | None = None, tensor_model_parallel_size: int = 1,
                    pipeline_model_parallel_size: int = 1, data_fingerprint: dict | None = None) -> str:
    """Save tag iter_NNNNNNN (collective): shards, mixln_meta.json, manifest.json, then `latest`.
    `model_config` is the ModelConfig, `cfg` the TrainingConfig (both stored in the client state)."""
    tag = tag_for(train_state.iteration)
    tag_dir = os.path.join(save_dir, tag)
    if is_rank0() and os.path.exists(os.path.join(tag_dir, MANIFEST)):
        os.remove(os.path.join(tag_dir, MANIFEST))  # re-saving a tag: it is incomplete until the new manifest
    state = {
        UNIVERSAL_INFO_KEY: universal_checkpoint_info(engine.module),  # for ds_to_universal
        CLIENT_KEY: client_state(train_state, model_config.to_dict(), cfg.to_dict(), gather_rng_states()),
    }
    engine.save_checkpoint(save_dir, tag=tag, client_state=state, save_latest=False)
    barrier()  # every rank's shards are on disk
    if is_rank0():
        CheckpointMeta(
            tag=tag, train_state=state[CLIENT_KEY]["train_state"], model_config=model_config.to_dict(),
            world_size=dist.get_world_size(), data_parallel_size=data_parallel_size,
            zero_stage=engine.zero_optimization_stage(), bf16=engine.bfloat16_enabled(), bf16_pure=bool(cfg.bf16_pure),
            tensor_model_parallel_size=tensor_model_parallel_size,
            pipeline_model_parallel_size=pipeline_model_parallel_size, data_fingerprint=data_fingerprint,
            lr_schedule=lr_schedule_of(cfg),
        ).write(tag_dir)
    barrier()  # mixln_meta.json is on disk: the manifest covers it
    write_manifest_shared(tag_dir)
    if is_rank0():
        write_latest(save_dir, tag)
        prune_checkpoints(save_dir, keep_last)
    barrier()
    return tag


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
    my_files = [files[i] for i in assign(files, sizes, *rank_world())]
    entries = dict(all_ranks(list(describe(tag_dir, my_files).items())))
    if is_rank0():
        write_manifest(tag_dir, entries)


def prune_checkpoints(save_dir: str, keep_last: int) -> None:
    """Delete all but the newest `keep_last` tags (never the one `latest` names)."""
    if keep_last <= 0:
        return
    latest = read_latest(save_dir)
    for tag in list_tags(save_dir)[:-keep_last]:
        if tag != latest:
            shutil.rmtree(os.path.join(save_dir, tag), ignore_errors=True)
