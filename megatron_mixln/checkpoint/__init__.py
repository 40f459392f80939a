"""The checkpoint format: what is on disk (layout, meta), how it is saved, verified, loaded, converted.

    layout.py     file names, tags (iter_NNNNNNN), the `latest` pointer       (torch-free)
    meta.py       mixln_meta.json (CheckpointMeta), the client state, TrainState
    io.py         torch.load with weights_only=True and DeepSpeed's record types only
    save.py       the save protocol: shards -> sidecar -> manifest -> `latest` -> prune
    load.py       verify against the manifest, inspect, fall back, restore
    compat.py     can this run resume that checkpoint (TP x PP, ZeRO, precision)? what to run if not
    convert.py    DeepSpeed TP/PP layouts <-> plain safetensors
    universal.py  DeepSpeed's universal format (optimizer states resharded over DP/TP/ZeRO stage)
    reader.py     read_full_state_dict: any checkpoint (plain, TP/PP, ZeRO 0-3) -> one full state dict

docs/checkpoint-format.md describes the files. Names are resolved lazily, so the torch-free modules
(layout) stay importable without torch.
"""
from __future__ import annotations

from megatron_mixln.lazy import lazy_exports

_EXPORTS = {
    "LATEST": "layout", "META": "layout", "TAG_RE": "layout", "tag_for": "layout", "parse_tag": "layout",
    "list_tags": "layout", "read_latest": "layout", "write_latest": "layout", "resolve_tag": "layout",
    "is_plain_dir": "layout",
    "CheckpointMeta": "meta", "TrainState": "meta",
    "safe_load": "io",
    "save_checkpoint": "save", "prune_checkpoints": "save", "write_manifest_shared": "save",
    "candidate_tags": "load", "verify_checkpoint": "load", "inspect_checkpoint": "load",
    "fallback_warning": "load", "load_checkpoint": "load",
    "check_resume_layout": "compat", "convert_command": "compat",
    "convert": "convert", "read_deepspeed_checkpoint": "convert", "write_deepspeed_checkpoint": "convert",
    "save_plain": "convert", "load_plain": "convert",
    "convert_to_universal": "universal",
    "read_full_state_dict": "reader", "FullCheckpoint": "reader",
}

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
