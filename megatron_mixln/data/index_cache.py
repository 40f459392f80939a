"""Build-once, load-everywhere cache of dataset index arrays (.npy files).

Index building (shuffles over every document of every epoch) is done by global rank 0 when
``torch.distributed`` is initialized; the other ranks wait at a barrier and memory-map the files.
The cache key is a hash of everything the arrays depend on, so changed settings or a re-made
dataset never reuse stale indices. Each array is written temp-then-rename and the description
file last, which marks the set complete: a run killed mid-write leaves no half cache behind.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Callable

import numpy as np

from megatron_mixln.fileio import atomic_open, atomic_write_json

Arrays = dict[str, np.ndarray]


def _distributed() -> tuple[bool, int]:
    try:
        import torch.distributed as dist
    except ImportError:
        return False, 0
    if dist.is_available() and dist.is_initialized():
        return True, dist.get_rank()
    return False, 0


def description_hash(description: dict) -> str:
    return hashlib.sha1(json.dumps(description, sort_keys=True).encode()).hexdigest()[:24]


def _save(cache_dir: str, base: str, description: dict, arrays: Arrays) -> None:
    os.makedirs(cache_dir, exist_ok=True)
    for name, array in arrays.items():
        with atomic_open(os.path.join(cache_dir, f"{base}-{name}.npy"), "wb") as fh:
            np.save(fh, np.ascontiguousarray(array), allow_pickle=False)
    atomic_write_json(os.path.join(cache_dir, f"{base}-description.json"), description)


def _load(cache_dir: str, base: str, names: list[str]) -> Arrays | None:
    paths = {n: os.path.join(cache_dir, f"{base}-{n}.npy") for n in names}
    if not os.path.isfile(os.path.join(cache_dir, f"{base}-description.json")):
        return None
    if not all(os.path.isfile(p) for p in paths.values()):
        return None
    try:
        return {n: np.load(p, mmap_mode="r", allow_pickle=False) for n, p in paths.items()}
    except (OSError, ValueError):
        return None


def cached_arrays(cache_dir: str | None, kind: str, description: dict, names: list[str],
                  build: Callable[[], Arrays]) -> Arrays:
    """The arrays ``names`` for ``description``: loaded from ``cache_dir`` or built (and saved).

    With no ``cache_dir`` every process builds in memory (the result is deterministic anyway).
    """
    if cache_dir is None:
        return build()
    base = f"{description_hash(description)}-{kind}"
    is_dist, rank = _distributed()
    if rank == 0 and _load(cache_dir, base, names) is None:
        _save(cache_dir, base, description, build())
    if is_dist:
        import torch.distributed as dist

        dist.barrier()
    arrays = _load(cache_dir, base, names)
    if arrays is None:
        # Rank 0 wrote to a cache dir this node does not see (not shared): build locally.
        arrays = build()
        _save(cache_dir, base, description, arrays)
        arrays = _load(cache_dir, base, names) or arrays
    return arrays
