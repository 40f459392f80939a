"""Names on disk: the files of a checkpoint directory, its tags and the `latest` pointer.

    SAVE_DIR/latest                   the tag of the newest *complete* checkpoint (written atomically)
    SAVE_DIR/iter_0000100/            one tag: DeepSpeed's files plus
        mixln_meta.json               the trainer's sidecar (checkpoint.meta.CheckpointMeta)
        manifest.json                 size + xxh3-128 of every file (megatron_mixln.manifest), written last
        converted.json                only in a converted checkpoint (checkpoint.convert): its TP x PP layout
        universal.json                only in a universal checkpoint (checkpoint.universal): its source layout
    PLAIN_DIR/model.safetensors, config.json[, trainer_state.pt]   a plain checkpoint (checkpoint.convert)

Torch-free, so the sweep tools can read run states without importing it.
"""
from __future__ import annotations

import json
import os
import re

from megatron_mixln.fileio import atomic_write_text
from megatron_mixln.manifest import MANIFEST

LATEST = "latest"
META = "mixln_meta.json"
CONVERTED = "converted.json"  # marks a converted DeepSpeed checkpoint: load it with load_optimizer_states=False
UNIVERSAL = "universal.json"  # marks a universal checkpoint: {"source", "source_tag", "source_layout", ...}
PLAIN_WEIGHTS, PLAIN_CONFIG, PLAIN_TRAINER_STATE = "model.safetensors", "config.json", "trainer_state.pt"
TAG_RE = re.compile(r"^iter_(\d{7,})$")

__all__ = ["LATEST", "META", "MANIFEST", "CONVERTED", "UNIVERSAL", "PLAIN_WEIGHTS", "PLAIN_CONFIG",
           "PLAIN_TRAINER_STATE", "TAG_RE", "tag_for", "parse_tag", "list_tags", "latest_path", "read_latest",
           "write_latest", "resolve_tag", "is_plain_dir", "is_tag_dir", "hf_model_type"]


def tag_for(iteration: int) -> str:
    """The tag of the checkpoint saved after `iteration` optimizer steps: iter_0000100."""
    return f"iter_{iteration:07d}"


def parse_tag(tag: str | None) -> int | None:
    """The iteration of an iter_NNNNNNN tag (None for any other name)."""
    m = TAG_RE.match(tag or "")
    return int(m[1]) if m else None


def list_tags(save_dir: str) -> list[str]:
    """The iter_* tag directories of save_dir, oldest first."""
    tags = [t for t in os.listdir(save_dir) if TAG_RE.match(t) and os.path.isdir(os.path.join(save_dir, t))]
    return sorted(tags, key=parse_tag)


def latest_path(save_dir: str) -> str:
    return os.path.join(save_dir, LATEST)


def read_latest(save_dir: str) -> str | None:
    """The tag `latest` names (None when there is no such file, or it is empty or unreadable)."""
    try:
        with open(latest_path(save_dir)) as fh:
            return fh.read().strip() or None
    except OSError:
        return None


def write_latest(save_dir: str, tag: str) -> None:
    """Point `latest` at tag (temp file + rename: a reader never sees a torn name)."""
    atomic_write_text(latest_path(save_dir), tag)


def is_plain_dir(path: str) -> bool:
    return os.path.isfile(os.path.join(path, PLAIN_WEIGHTS))


def is_tag_dir(path: str) -> bool:
    """One tag of a --save directory (what DeepSpeed writes per save: mp_rank_*/zero_* files, our metadata)."""
    names = os.listdir(path)
    return "mixln_meta.json" in names or any(n.startswith(("mp_rank_", "zero_pp_rank_", "layer_")) for n in names)


def hf_model_type(path: str) -> str | None:
    """The `model_type` (or "unknown") of a Hugging Face model directory -- its config.json names a model_type
    or architectures, which a plain checkpoint's config.json (a ModelConfig) never does -- else None."""
    try:
        with open(os.path.join(path, PLAIN_CONFIG), encoding="utf-8") as fh:
            cfg = json.load(fh)
    except (OSError, ValueError):
        return None
    if isinstance(cfg, dict) and ("model_type" in cfg or "architectures" in cfg):
        return str(cfg.get("model_type", "unknown"))
    return None


def resolve_tag(ckpt_dir: str, tag: str | None) -> str:
    """The DeepSpeed tag to read: `tag`, else the one `ckpt_dir/latest` names.
    Raises FileNotFoundError naming what is missing (the directory itself, or `latest`)."""
    if not os.path.isdir(ckpt_dir):
        raise FileNotFoundError(
            f"{ckpt_dir}: no such directory (expected a DeepSpeed checkpoint directory written by --save, "
            f"or a plain one holding {PLAIN_WEIGHTS})")
    if tag is not None:
        return tag
    latest = read_latest(ckpt_dir)
    if latest is None and is_tag_dir(ckpt_dir):
        parent, name = os.path.split(os.path.normpath(ckpt_dir))
        raise FileNotFoundError(
            f"{ckpt_dir}: a checkpoint tag directory, not the --save directory; pass the directory above it "
            f"and the tag: {parent or '.'} --tag {name}")
    if latest is None:
        raise FileNotFoundError(
            f"{ckpt_dir}: neither a plain checkpoint (no {PLAIN_WEIGHTS}) nor a DeepSpeed one with a '{LATEST}' "
            f"file; if it holds DeepSpeed tag directories, name one with --tag")
    return latest
