"""Preprocessing split across jobs: a deterministic partition of the input files, and the merge of
the parts' outputs into what one process would have written (Megatron-LM's
``tools/merge_datasets.py``, plus the summary and the checks)."""

from __future__ import annotations

import json
import os
import time
from typing import Sequence

from .errors import DataError
from megatron_mixln.fileio import atomic_write_json
from .indexed_dataset import IndexedDataset, bin_path, idx_path
from .indexed_writer import merge_indexed_datasets


def check_partition(shard_index: int, num_shards: int) -> None:
    """Raise DataError naming the flag unless ``0 <= shard_index < num_shards``."""
    if num_shards < 1:
        raise DataError(f"--num-shards must be >= 1, got {num_shards}")
    if not 0 <= shard_index < num_shards:
        raise DataError(f"--shard-index {shard_index}: must be in 0..{num_shards - 1} (--num-shards {num_shards})")


def partition_files(files: list[str], shard_index: int, num_shards: int) -> list[str]:
    """Part ``shard_index`` of ``num_shards``: a contiguous run of the (sorted, expanded) input
    files, as equal in count as possible. Contiguous, so the parts merged in index order hold the
    documents in the order one process would write them. Raises DataError naming the flag."""
    check_partition(shard_index, num_shards)
    if num_shards > len(files):
        raise DataError(f"--num-shards {num_shards}: only {len(files)} input files to partition; "
                        f"use at most {len(files)}")
    return files[shard_index * len(files) // num_shards:(shard_index + 1) * len(files) // num_shards]


def _summary(prefix: str) -> dict | None:
    path = prefix + ".summary.json"
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except ValueError as err:
        raise DataError(f"{path}: not valid JSON ({err})") from None


_MUST_AGREE = {"dtype": "dtype", "append_eod": "--append-eod", "json_key": "JSON key"}


def check_mergeable(prefixes: Sequence[str], out_prefix: str) -> list[dict | None]:
    """Refuse, in one line naming the file, parts that cannot be concatenated: a missing or broken
    pair, another dtype, another tokenizer or --append-eod (from the parts' ``.summary.json``; all
    parts have one or none do). Returns the summaries. Reads headers only."""
    if not prefixes:
        raise DataError("--input: no datasets to merge")
    out = os.path.abspath(out_prefix)
    if any(os.path.abspath(p) == out for p in prefixes):
        raise DataError(f"--output-prefix {out_prefix}: is also an --input; write the merge elsewhere")
    datasets = [IndexedDataset(p) for p in prefixes]
    first = datasets[0]
    for ds in datasets[1:]:
        if ds.dtype != first.dtype:
            raise DataError(f"{idx_path(ds.path_prefix)}: dtype {ds.dtype.name} differs from "
                            f"{idx_path(first.path_prefix)}'s {first.dtype.name}; cannot merge")
    summaries = [_summary(p) for p in prefixes]
    with_summary = [p for p, s in zip(prefixes, summaries) if s is not None]
    if with_summary and len(with_summary) < len(prefixes):
        missing = next(p for p, s in zip(prefixes, summaries) if s is None)
        raise DataError(f"{missing}.summary.json: missing, while {with_summary[0]} has one; cannot "
                        f"check that the parts share a tokenizer")
    if with_summary:
        ref = summaries[0]
        for prefix, summary in zip(prefixes[1:], summaries[1:]):
            if summary["tokenizer"]["fingerprint"] != ref["tokenizer"]["fingerprint"]:
                raise DataError(f"{prefix}.summary.json: tokenizer {summary['tokenizer']['name']} differs "
                                f"from {prefixes[0]}'s {ref['tokenizer']['name']}; cannot merge")
            for key, name in _MUST_AGREE.items():
                if summary.get(key) != ref.get(key):
                    raise DataError(f"{prefix}.summary.json: {name} {summary.get(key)!r} differs from "
                                    f"{prefixes[0]}'s {ref.get(key)!r}; cannot merge")
    return summaries


def merge_preprocessed(prefixes: Sequence[str], out_prefix: str) -> dict:
    """Concatenate the datasets ``prefixes`` in order into ``out_prefix`` (streamed, flat memory,
    temp names then rename), check it reads back, and write ``out_prefix.summary.json`` (counts,
    skipped lines and inputs of all parts). Raises DataError before writing for parts that
    cannot be merged (see ``check_mergeable``)."""
    started = time.time()
    summaries = check_mergeable(prefixes, out_prefix)
    summary_file = out_prefix + ".summary.json"
    if os.path.exists(summary_file):  # must not outlive the data it describes
        os.remove(summary_file)
    documents, tokens = merge_indexed_datasets(list(prefixes), out_prefix)
    merged = IndexedDataset(out_prefix, full_check=True)
    summary = {"output_prefix": os.path.abspath(out_prefix), "bin": bin_path(os.path.abspath(out_prefix)),
               "idx": idx_path(os.path.abspath(out_prefix)), "documents": documents, "tokens": tokens,
               "dtype": merged.dtype.name, "merged_from": [os.path.abspath(p) for p in prefixes],
               "elapsed_s": round(time.time() - started, 3)}
    if summaries[0] is not None:
        ref = summaries[0]
        skipped: dict[str, dict] = {}
        for s in summaries:
            for reason, entry in s["skipped"].items():
                into = skipped.setdefault(reason, {"count": 0, "examples": []})
                into["count"] += entry["count"]
                into["examples"] = (into["examples"] + entry["examples"])[:5]
        summary.update({
            "json_key": ref.get("json_key"), "append_eod": ref.get("append_eod"),
            "tokenizer": ref["tokenizer"], "skipped": skipped,
            "inputs": [i for s in summaries for i in s.get("inputs", [])],
            "parts": [{"prefix": os.path.abspath(p), "documents": s["documents"], "tokens": s["tokens"],
                       "partition": s.get("partition"),
                       "tokenizer_backend": (s.get("tokenizer_backend") or {}).get("used")}
                      for p, s in zip(prefixes, summaries)]})
    atomic_write_json(summary_file, summary)
    return summary
