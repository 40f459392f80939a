"""Hugging Face ``datasets`` input, streamed, one task per underlying data file (shard).

``allenai/c4`` (config ``en``) streams 1024 train shards; each becomes one resumable task exactly
like a local ``.json.gz`` file. A local directory or JSON-lines file that ``datasets`` can load
works the same way, which is how this path is tested offline.
"""

from __future__ import annotations

import os
from typing import Iterator

from .errors import DataError
from .inputs import Task


_NO_NETWORK_HINT = (" If the machine has no network, download the files (e.g. C4's c4-train.*.json.gz) and "
                    "pass them with --input instead.")


def _check_hub_reachable(name: str, config: str | None, split: str, timeout: float = 10.0) -> None:
    """Fail at once, in one line, when the hub cannot be reached: `datasets` would otherwise retry
    for ~25 s before its own error. Skipped when HF_HUB_OFFLINE/HF_DATASETS_OFFLINE is set (then
    `datasets` itself fails at once unless the data is in its local cache).
    Raises DataError naming the host, the reason and the --input alternative."""
    import socket
    from urllib.parse import urlparse

    import datasets

    if datasets.config.HF_HUB_OFFLINE:
        return
    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    host, port = url.hostname, url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as err:
        raise DataError(f"--hf-dataset {name!r} (config {config!r}, split {split!r}): cannot reach the hub at "
                        f"{host}:{port} ({err or type(err).__name__}).{_NO_NETWORK_HINT}") from None


def _load_stream(name: str, config: str | None, split: str):
    import datasets

    local = os.path.exists(name)
    if not local:
        _check_hub_reachable(name, config, split)
    try:
        if os.path.isfile(name):
            return datasets.load_dataset("json", data_files=name, split=split, streaming=True)
        return datasets.load_dataset(name, config, split=split, streaming=True)
    except Exception as err:  # datasets raises many types (ConnectionError, FileNotFoundError, ...)
        hint = "" if local else (" HF_HUB_OFFLINE is set: only locally cached datasets load."
                                 if datasets.config.HF_HUB_OFFLINE else "") + _NO_NETWORK_HINT
        detail = " ".join(str(err).split())  # one line, whatever the library put in its message
        raise DataError(f"--hf-dataset {name!r} (config {config!r}, split {split!r}) could not be "
                        f"loaded: {type(err).__name__}: {detail}.{hint}") from None


def _local_fingerprint(name: str) -> tuple[int, int]:
    """(total size, newest mtime) of a local dataset, so a changed one is not resumed from."""
    if not os.path.exists(name):
        return 0, 0  # hub datasets are identified by name/config/split
    paths = [name] if os.path.isfile(name) else [
        os.path.join(root, f) for root, _, files in os.walk(name) for f in files]
    stats = [os.stat(p) for p in paths]
    return sum(s.st_size for s in stats), max([s.st_mtime_ns for s in stats] + [0])


def plan_hf_tasks(name: str, config: str | None, split: str) -> list[Task]:
    stream = _load_stream(name, config, split)
    num_shards = max(int(stream.num_shards), 1)
    size, mtime = _local_fingerprint(name)
    path = os.path.abspath(name) if os.path.exists(name) else name
    return [Task(i, path, size, mtime, hf={"config": config, "split": split, "shard": i,
                                           "num_shards": num_shards})
            for i in range(num_shards)]


class HFRecordReader:
    """Iterate ``(example number within the shard, example dict)`` of one shard."""

    def __init__(self, task: Task) -> None:
        self.task = task
        self.position = 0  # no byte positions for streamed datasets; progress counts documents
        self.first_line_offset = 0

    def __iter__(self) -> Iterator[tuple[int, dict]]:
        hf = self.task.hf
        stream = _load_stream(self.task.path, hf["config"], hf["split"])
        if hf["num_shards"] > 1:
            stream = stream.shard(num_shards=hf["num_shards"], index=hf["shard"])
        yield from enumerate(stream, 1)
