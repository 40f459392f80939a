"""Read the weights of an HF model directory: safetensors (single or sharded + index) or pytorch_model.bin
(single or sharded, torch.load(weights_only=True)); a missing or truncated shard is a clear error."""
from __future__ import annotations

import json
import os

import torch

CANDIDATES = ("model.safetensors.index.json", "model.safetensors", "pytorch_model.bin.index.json", "pytorch_model.bin")


def weight_files(hf_dir: str) -> list[str]:
    """The weight files of `hf_dir`, in index order; every file an index names must exist."""
    for name in CANDIDATES:
        path = os.path.join(hf_dir, name)
        if not os.path.isfile(path):
            continue
        if not name.endswith(".index.json"):
            return [path]
        try:
            with open(path) as f:
                weight_map = json.load(f)["weight_map"]
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{path}: not a valid weight index ({e})") from None
        shards = list(dict.fromkeys(weight_map.values()))
        for shard in shards:
            if not os.path.isfile(os.path.join(hf_dir, shard)):
                raise ValueError(f"{path}: shard {shard} is missing from {hf_dir}")
        return [os.path.join(hf_dir, s) for s in shards]
    raise ValueError(f"{hf_dir}: no weights (expected one of {', '.join(CANDIDATES)})")


def check_weight_files(files: list[str]) -> None:
    """Cheap integrity check before any conversion work: safetensors headers parse and the data they
    describe fits in the file (a truncated download fails here)."""
    from safetensors import safe_open

    for path in files:
        if path.endswith(".safetensors"):
            try:
                with open(path, "rb") as f:
                    header_len = int.from_bytes(f.read(8), "little")
                    header = json.loads(f.read(header_len))
                end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
                if os.path.getsize(path) < 8 + header_len + end:
                    raise ValueError(f"{os.path.getsize(path)} bytes, the header describes {8 + header_len + end}")
                with safe_open(path, "pt"):
                    pass
            except Exception as e:  # truncated header, bad JSON, safetensors' own errors
                raise ValueError(f"{path}: truncated or corrupt safetensors file ({e})") from None


def load_weights(files: list[str]) -> dict:
    """All tensors of the files, by name."""
    from safetensors.torch import load_file

    out = {}
    for path in files:
        try:
            part = load_file(path) if path.endswith(".safetensors") else torch.load(
                path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise ValueError(f"{path}: cannot be read ({e})") from None
        if not isinstance(part, dict):
            raise ValueError(f"{path}: expected a state dict of tensors")
        out.update(part)
    return out
