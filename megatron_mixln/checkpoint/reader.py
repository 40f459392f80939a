"""Read any training checkpoint into one full state dict: plain dirs, DeepSpeed TP/PP layouts, ZeRO 0-3.

ZeRO 0-2 and pipeline checkpoints hold whole (TP-sharded) weights in their model-states files and are read by
`checkpoint.convert`. ZeRO-3 partitions every weight over the data-parallel ranks; DeepSpeed's own
`zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint` reassembles them (fp32), once per tensor-parallel
rank (it knows nothing of TP, so each TP rank's files are shown to it alone), then TP shards are merged.
"""
from __future__ import annotations

import contextlib
import glob
import os
import re
import sys
import tempfile
from typing import NamedTuple

from megatron_mixln.checkpoint.convert import (SIDECARS, config_from_metadata, load_plain, read_deepspeed_checkpoint,
                                               read_sidecars)
from megatron_mixln.checkpoint.io import safe_load
from megatron_mixln.checkpoint.layout import PLAIN_CONFIG, hf_model_type, is_plain_dir, resolve_tag

_ZERO3_MODEL = re.compile(r"zero_pp_rank_(\d+)_mp_rank_(\d+)_model_states\.pt$")


def zero3_files(tag_dir: str) -> dict[int, list[str]]:
    """{tp rank: [file names]} of a ZeRO-3 tag directory (empty when it is not one)."""
    by_tp: dict[int, list[str]] = {}
    for name in os.listdir(tag_dir) if os.path.isdir(tag_dir) else []:
        m = _ZERO3_MODEL.match(name)
        if m:
            by_tp.setdefault(int(m.group(2)), [])
    for tp in by_tp:
        by_tp[tp] = sorted(n for n in os.listdir(tag_dir) if f"_mp_rank_{tp:02d}_" in n)
    return by_tp


def read_zero3_checkpoint(ckpt_dir: str, tag: str) -> tuple[dict, dict]:
    """-> (full fp32 state dict, client metadata) via DeepSpeed's zero_to_fp32, merged over TP ranks."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from megatron_mixln.parallel.sharding import merge_tp

    tag_dir = os.path.join(ckpt_dir, tag)
    by_tp = zero3_files(tag_dir)
    if sorted(by_tp) != list(range(len(by_tp))):
        raise ValueError(f"{tag_dir}: ZeRO-3 files of tensor-parallel ranks {sorted(by_tp)} (incomplete set)")
    shards = []
    for tp in range(len(by_tp)):
        with tempfile.TemporaryDirectory() as view:  # this TP rank's files only, under the same tag
            os.makedirs(os.path.join(view, tag))
            for name in by_tp[tp]:
                os.symlink(os.path.join(os.path.abspath(tag_dir), name), os.path.join(view, tag, name))
            with contextlib.redirect_stdout(sys.stderr):  # its progress prints; stdout stays the tool's
                shards.append(dict(get_fp32_state_dict_from_zero_checkpoint(view, tag)))
    first = sorted(glob.glob(os.path.join(tag_dir, "zero_pp_rank_0_mp_rank_00_model_states.pt")))
    meta = safe_load(first[0], map_location="cpu") if first else {}
    meta = {k: v for k, v in meta.items() if k not in ("module", "optimizer", "param_shapes", "shared_params",
                                                        "frozen_param_shapes", "frozen_param_fragments")}
    meta[SIDECARS] = read_sidecars(tag_dir)  # mixln_meta.json: carried to a converted copy
    plain = merge_tp(shards) if len(shards) > 1 else shards[0]
    return {k: v.contiguous() for k, v in plain.items()}, meta


class FullCheckpoint(NamedTuple):
    state_dict: dict  # the Transformer's own keys, full (unsharded) tensors
    config: object  # the ModelConfig the trainer recorded (None when it recorded none)
    metadata: dict  # DeepSpeed's client metadata (counters, the trainer's client state), or a plain dir's
    source: dict  # {"format": "plain"} or {"format": "deepspeed", "tag", "tp", "pp"|"zero_stage", ...}


def _refuse_hf_dir(path: str) -> None:
    """A Hugging Face model directory also holds model.safetensors + config.json; say what it is."""
    model_type = hf_model_type(path)
    if model_type is not None:
        raise ValueError(
            f"{path}: a Hugging Face model directory (config.json has model_type {model_type!r}), "
            "not a training checkpoint; it is already exported (import it for training with "
            "tools/convert_from_hf.py)")


def read_full_state_dict(path: str, tag: str | None = None) -> FullCheckpoint:
    """A plain dir or a training --save dir (any TP/PP layout, ZeRO 0-3) -> one full state dict with its
    config. `tag`: default the one `latest` names. Raises FileNotFoundError naming the missing directory
    or `latest`, ValueError naming the file whose config or layout is bad."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"--checkpoint {path}: no such directory")
    if is_plain_dir(path):
        _refuse_hf_dir(path)
        try:
            plain, config, meta = load_plain(path)
        except (TypeError, ValueError) as e:  # ModelConfig(**config.json): an unknown field or value
            raise ValueError(f"{os.path.join(path, PLAIN_CONFIG)}: {e}") from None
        return FullCheckpoint(plain, config, meta, {"format": "plain"})
    tag = resolve_tag(path, tag)
    tag_dir = os.path.join(path, tag)
    if not os.path.isdir(tag_dir):
        raise FileNotFoundError(f"{tag_dir}: no such checkpoint tag")
    if zero3_files(tag_dir):
        plain, meta = read_zero3_checkpoint(path, tag)
        source = {"format": "deepspeed", "zero_stage": 3, "tag": tag, "tp": len(zero3_files(tag_dir))}
    else:
        plain, meta, layout = read_deepspeed_checkpoint(path, tag)
        source = {"format": "deepspeed", "tag": tag, **layout}
    try:
        config = config_from_metadata(meta)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{tag_dir}: the recorded model_config: {e}") from None
    return FullCheckpoint(plain, config, meta, source)
