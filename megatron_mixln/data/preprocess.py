"""JSON-lines (C4) corpus -> Megatron indexed datasets ``<prefix>_<key>_document.bin/.idx``.

The run, in order:
  1. validate everything cheap first (inputs, output directory, workers, tokenizer), so a typo
     fails in a second instead of after an hour;
  2. cut the input into tasks (one per gzip file, byte ranges of big plain files, or one per
     Hugging Face shard) and skip the tasks whose shard manifest from an earlier, killed run is
     still valid (same input size/mtime, same settings);
  3. tokenize the remaining tasks in a ``multiprocessing`` pool, each writing its own shard files;
  4. merge the shards in task order (so the bytes do not depend on the worker count or on which
     run did which shard) into the final files under temporary names, check them, rename them, and
     write the summary JSON; then delete the shard directory.

Memory stays flat: workers stream lines and write tokens as they go; nothing per document is kept
except int32/int64 lengths, which are spilled to disk.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import sys
import time
from dataclasses import dataclass, field
from itertools import islice

from .errors import DataError
from megatron_mixln.fileio import atomic_write_json
from .hf_input import plan_hf_tasks
from .indexed_dataset import IndexedDataset, bin_path, idx_path, optimal_dtype
from .indexed_writer import merge_indexed_datasets
from .inputs import Task, check_input, compression_of, expand_inputs, plan_file_tasks
from .multinode import check_partition, partition_files
from .shard_worker import (ShardSettings, init_worker, manifest_path, process_task, shard_prefix,
                           task_texts)
from .tokenizer import build_tokenizer
from .tokenizer_backends import BACKENDS, select_backend
from .worker_pool import run_in_workers

FORMAT_VERSION = 2  # bump when the shard contents for the same settings would change


@dataclass
class PreprocessOptions:
    output_prefix: str
    tokenizer: str
    inputs: list[str] = field(default_factory=list)
    json_keys: list[str] = field(default_factory=lambda: ["text"])
    append_eod: bool = False
    workers: int = 1
    strict: bool = False
    max_docs: int | None = None
    chunk_mb: float = 256.0  # plain files above this are split into byte ranges
    hf_dataset: str | None = None
    hf_config: str | None = None
    hf_split: str = "train"
    keep_shards: bool = False
    progress: bool = True
    batch_docs: int = 1024
    tokenizer_backend: str = "auto"
    verify_fraction: float = 0.005  # of the fast backend's documents, re-encoded by the reference
    cross_check_docs: int = 256  # first N and random N documents cross-checked at start
    shard_index: int = 0  # this job's part of the input files (multinode.partition_files)
    num_shards: int = 1


def output_prefix_for(prefix: str, key: str) -> str:
    """Megatron's naming: ``<output prefix>_<json key>_document``."""
    return f"{prefix}_{key}_document"


def summary_path_for(prefix: str, key: str) -> str:
    return output_prefix_for(prefix, key) + ".summary.json"


def _check_output_dir(prefix: str) -> None:
    directory = os.path.dirname(os.path.abspath(prefix))
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError as err:
        raise DataError(f"--output-prefix {prefix!r}: cannot create {directory} ({err})") from None
    if not os.access(directory, os.W_OK | os.X_OK):
        raise DataError(f"--output-prefix {prefix!r}: directory {directory} is not writable")


def _validate(opts: PreprocessOptions):
    """All cheap checks, before any tokenizing. Returns (tokenizer, tasks, input files)."""
    if opts.workers < 1:
        raise DataError(f"--workers must be >= 1, got {opts.workers}")
    if opts.max_docs is not None and opts.max_docs < 1:
        raise DataError(f"--max-docs must be >= 1, got {opts.max_docs}")
    if opts.chunk_mb <= 0:
        raise DataError(f"--chunk-mb must be > 0, got {opts.chunk_mb}")
    if opts.tokenizer_backend not in BACKENDS:
        raise DataError(f"--tokenizer-backend {opts.tokenizer_backend!r}: choose one of {', '.join(BACKENDS)}")
    if not 0.0 <= opts.verify_fraction <= 1.0:
        raise DataError(f"--verify-fraction must be in [0, 1], got {opts.verify_fraction}")
    if not opts.json_keys or any(not re.fullmatch(r"[\w.\-]+", k) for k in opts.json_keys):
        raise DataError(f"--json-keys {opts.json_keys}: need one or more plain key names "
                        f"(they become part of the output file names)")
    if bool(opts.inputs) == bool(opts.hf_dataset):
        raise DataError("give either --input (files/globs) or --hf-dataset, exactly one of them")
    check_partition(opts.shard_index, opts.num_shards)
    if opts.num_shards > 1 and opts.hf_dataset:
        raise DataError("--num-shards: partitions --input files; not available with --hf-dataset")
    if opts.num_shards > 1 and opts.max_docs is not None:
        raise DataError("--max-docs: cannot be combined with --num-shards > 1 (each part would keep "
                        "its own first documents); cut the merged dataset instead")
    _check_output_dir(opts.output_prefix)
    tokenizer = build_tokenizer(opts.tokenizer)
    if opts.append_eod and tokenizer.eod is None:
        raise DataError(f"--append-eod: tokenizer {tokenizer.name} has no end-of-document "
                        f"(eos) token")
    if opts.append_eod and not 0 <= tokenizer.eod < tokenizer.vocab_size:
        raise DataError(f"--append-eod: the end-of-document id {tokenizer.eod} of tokenizer "
                        f"{tokenizer.name} is outside its vocabulary 0..{tokenizer.vocab_size - 1} "
                        f"(and the output dtype chosen from it)")
    if opts.hf_dataset:
        return tokenizer, plan_hf_tasks(opts.hf_dataset, opts.hf_config, opts.hf_split), []
    files = expand_inputs(opts.inputs)
    if opts.num_shards != 1 or opts.shard_index != 0:
        files = partition_files(files, opts.shard_index, opts.num_shards)
    encodings = {path: check_input(path, opts.json_keys) for path in files}
    return tokenizer, plan_file_tasks(files, max(int(opts.chunk_mb * 2**20), 1), encodings), files


def _start_sample(tasks: list[Task], key: str, n: int, seed: str) -> list[str]:
    """The first ``n`` documents of the input and up to ``n`` others drawn at random (reservoir
    sampling) from the first ``20 n`` documents of up to three randomly chosen tasks; no document
    is drawn twice, so a count of differing documents counts documents."""
    first: list[str] = []
    taken: set[tuple[int, int]] = set()  # (task ordinal, document index) of the first n
    for task in tasks:
        for i, text in enumerate(islice(task_texts(task, key), n - len(first))):
            first.append(text)
            taken.add((task.ordinal, i))
        if len(first) == n:
            break
    rng = random.Random(seed)
    reservoir: list[str] = []
    seen = 0
    for task in rng.sample(tasks, min(3, len(tasks))):
        for i, text in enumerate(islice(task_texts(task, key), 20 * n)):
            if (task.ordinal, i) in taken:
                continue
            seen += 1
            if len(reservoir) < n:
                reservoir.append(text)
            elif (j := rng.randrange(seen)) < n:
                reservoir[j] = text
    return first + reservoir


def _settings_hash(opts: PreprocessOptions, tokenizer, dtype: str) -> str:
    # The eod id is not always in the tokenizer's file (a Hugging Face tokenizer_config.json).
    eod = tokenizer.eod if opts.append_eod else None
    blob = json.dumps({"format": FORMAT_VERSION, "tokenizer": tokenizer.fingerprint,
                       "keys": opts.json_keys, "eod": opts.append_eod, "eod_id": eod,
                       "strict": opts.strict,
                       "dtype": dtype, "max_docs": opts.max_docs}, sort_keys=True)
    return hashlib.sha1(blob.encode()).hexdigest()[:16]


def _load_manifest(settings: ShardSettings, task: Task) -> dict | None:
    """The manifest of a finished shard, or None when it must be (re)done."""
    task_id = task.identity(settings.settings_hash)
    try:
        with open(manifest_path(settings.shard_dir, task_id)) as fh:
            manifest = json.load(fh)
        if manifest.get("task_id") != task_id:
            return None
        for key in settings.json_keys:
            IndexedDataset(shard_prefix(settings.shard_dir, task_id, key))
    except (OSError, ValueError):  # missing, half-written or inconsistent: redo it
        return None
    return manifest


class _Progress:
    """tqdm bar over input bytes (documents for Hugging Face input) with docs/s and tokens/s."""

    def __init__(self, total_bytes: int, enabled: bool) -> None:
        from tqdm import tqdm

        self.by_docs = total_bytes == 0
        self.bar = tqdm(total=total_bytes or None, unit="doc" if self.by_docs else "B",
                        unit_scale=True, unit_divisor=1024 if not self.by_docs else 1000,
                        disable=not enabled, mininterval=0.5, desc="tokenizing", smoothing=0.1)
        self.started = time.time()
        self.docs = self.tokens = 0

    def update(self, nbytes: int, docs: int, tokens: int) -> None:
        self.docs += docs
        self.tokens += tokens
        elapsed = max(time.time() - self.started, 1e-9)
        self.bar.update(docs if self.by_docs else nbytes)
        self.bar.set_postfix_str(f"{self.docs / elapsed:,.0f} docs/s "
                                 f"{self.tokens / elapsed:,.0f} tok/s", refresh=False)

    def close(self) -> None:
        self.bar.close()


def _needed_tasks(tasks: list[Task], manifests: dict[int, dict], max_docs: int | None,
                  keys: list[str]) -> int:
    """How many leading tasks the output needs: all, or enough to reach --max-docs per key."""
    if max_docs is None:
        return len(tasks)
    totals = dict.fromkeys(keys, 0)
    for i, task in enumerate(tasks):
        if i not in manifests:
            return len(tasks)  # unknown yet: could still be needed
        for key in keys:
            totals[key] += manifests[i]["keys"][key]["documents"]
        if all(totals[k] >= max_docs for k in keys):
            return i + 1
    return len(tasks)


def _run_tasks(todo: list[Task], tasks: list[Task], manifests: dict[int, dict],
               settings: ShardSettings, opts: PreprocessOptions, bar: _Progress) -> None:
    """Tokenize ``todo``: inline for one worker, else on a process pool."""

    def still_needed(task: Task) -> bool:
        return task.ordinal < _needed_tasks(tasks, manifests, opts.max_docs, opts.json_keys)

    if opts.workers == 1:
        init_worker(settings, lambda r: bar.update(*r))
        for task in todo:
            if still_needed(task):
                manifests[task.ordinal] = process_task(task, settings)
        return
    run_in_workers(todo, settings, opts.workers,
                   on_progress=lambda r: bar.update(*r),
                   on_done=manifests.__setitem__, still_needed=still_needed)


def _absolute_examples(tasks: list[Task], manifests: dict[int, dict], key: str,
                       used: int) -> dict[str, dict]:
    """Skipped counts and ``file:line`` examples, with chunk line numbers made absolute."""
    skipped: dict[str, dict] = {}
    lines_before: dict[str, int] = {}
    for task in tasks[:used]:
        manifest = manifests[task.ordinal]
        base = lines_before.get(task.path, 0)
        for reason, count in manifest["keys"][key]["skipped"].items():
            entry = skipped.setdefault(reason, {"count": 0, "examples": []})
            entry["count"] += count
            for lineno, detail in manifest["keys"][key]["examples"].get(reason, []):
                if len(entry["examples"]) < 5:
                    where = (f"{task.describe()}: example {lineno}" if task.hf
                             else f"{task.path}: row {lineno}" if task.encoding == "parquet"
                             else f"{task.path}:{base + lineno}")
                    entry["examples"].append(f"{where}: {detail}" if detail else where)
        lines_before[task.path] = base + manifest["lines"]
    return skipped


def _clean_stale_temps(final_prefix: str) -> None:
    """Remove ``*.tmp-<pid>`` leftovers of our outputs from killed runs (dead pids only)."""
    directory = os.path.dirname(os.path.abspath(final_prefix))
    base = os.path.basename(final_prefix)
    for name in os.listdir(directory):
        match = re.fullmatch(re.escape(base) + r"\.(bin|idx)\.tmp-(\d+).*", name)
        if match:
            try:
                os.kill(int(match.group(2)), 0)
            except ProcessLookupError:
                os.remove(os.path.join(directory, name))
            except PermissionError:
                pass


def run_preprocess(opts: PreprocessOptions) -> dict[str, dict]:
    """Run the whole pipeline; returns the summary per JSON key (also written next to outputs)."""
    started = time.time()
    tokenizer, tasks, files = _validate(opts)
    dtype = optimal_dtype(tokenizer.vocab_size).name
    settings_hash = _settings_hash(opts, tokenizer, dtype)
    _, backend = select_backend(tokenizer, opts.tokenizer_backend,
                                lambda: _start_sample(tasks, opts.json_keys[0], opts.cross_check_docs,
                                                      settings_hash), opts.verify_fraction)
    if backend["fell_back"]:
        print(f"preprocess: --tokenizer-backend {opts.tokenizer_backend}: using {backend['used']}: "
              f"{backend['reason']}", file=sys.stderr)
    shard_dir = os.path.abspath(opts.output_prefix) + ".shards"
    os.makedirs(shard_dir, exist_ok=True)
    settings = ShardSettings(tokenizer=opts.tokenizer, json_keys=tuple(opts.json_keys),
                             append_eod=opts.append_eod, strict=opts.strict, dtype=dtype,
                             max_docs=opts.max_docs, shard_dir=shard_dir,
                             settings_hash=settings_hash, batch_docs=opts.batch_docs,
                             tokenizer_backend=backend["used"], verify_fraction=opts.verify_fraction)

    manifests = {t.ordinal: m for t in tasks if (m := _load_manifest(settings, t)) is not None}
    reused = sorted(manifests)
    todo = [t for t in tasks if t.ordinal not in manifests]
    total_bytes = sum(os.path.getsize(f) for f in files)
    bar = _Progress(total_bytes, opts.progress)
    for ordinal in reused:  # finished earlier: count them as done on the bar
        task = tasks[ordinal]
        end = task.end if task.end is not None else task.size
        bar.update(end - task.start if not task.hf else 0, 0, 0)
    try:
        _run_tasks(todo, tasks, manifests, settings, opts, bar)
    finally:
        bar.close()

    used = _needed_tasks(tasks, manifests, opts.max_docs, opts.json_keys)
    missing = [t.describe() for t in tasks[:used] if t.ordinal not in manifests]
    assert not missing, f"internal error: tasks not done: {missing[:3]}"
    for key in opts.json_keys:  # an empty dataset is always a mistake (and unreadable by Megatron)
        if not sum(manifests[t.ordinal]["keys"][key]["documents"] for t in tasks[:used]):
            skipped = {r: v["count"] for r, v in _absolute_examples(tasks, manifests, key,
                                                                     used).items()}
            if not opts.keep_shards:  # nothing worth resuming: an empty input leaves nothing behind
                shutil.rmtree(shard_dir, ignore_errors=True)
            raise DataError(f"no documents for JSON key {key!r} in the input (skipped lines: "
                            f"{skipped or 'none'}); check --json-keys and the input files")
    summaries = {}
    for key in opts.json_keys:
        final = os.path.abspath(output_prefix_for(opts.output_prefix, key))
        _clean_stale_temps(final)
        summary_file = summary_path_for(opts.output_prefix, key)
        if os.path.exists(summary_file):  # must not outlive the data it describes (a kill below)
            os.remove(summary_file)
        docs, tokens = merge_indexed_datasets(
            [shard_prefix(shard_dir, t.identity(settings_hash), key) for t in tasks[:used]],
            final, max_documents=opts.max_docs)
        IndexedDataset(final, full_check=True)  # never hand out a file we cannot read back
        elapsed = time.time() - started
        summary = {
            "output_prefix": final,
            "bin": bin_path(final), "idx": idx_path(final),
            "json_key": key,
            "documents": docs,
            "tokens": tokens,
            "dtype": dtype,
            "append_eod": opts.append_eod,
            "skipped": _absolute_examples(tasks, manifests, key, used),
            "utf8_boms_dropped": sum(manifests[t.ordinal].get("utf8_boms", 0)
                                     for t in tasks[:used]),
            "tokenizer": {"name": tokenizer.name, "vocab_size": tokenizer.vocab_size,
                          "eod": tokenizer.eod, "pad": tokenizer.pad, "bos": tokenizer.bos,
                          "fingerprint": tokenizer.fingerprint},
            "inputs": ([{"path": t.path, "size": t.size, "encoding": t.encoding,
                         "compression": compression_of(t.path)}
                        for t in tasks if t.start == 0] if files else
                       [{"hf_dataset": opts.hf_dataset, "config": opts.hf_config,
                         "split": opts.hf_split, "shards": len(tasks)}]),
            "shards": {"total": len(tasks), "used": used,
                       "reused": len([o for o in reused if o < used]),
                       "processed": len([o for o in manifests if o not in reused])},
            "tokenizer_backend": dict(
                backend, verify_fraction=opts.verify_fraction if backend["used"] == "gigatoken" else 0.0,
                verified_while_running=sum(manifests[t.ordinal].get("verified_documents", 0)
                                           for t in tasks[:used]),
                routed_to_reference=sum(manifests[t.ordinal].get("routed_documents", 0)
                                        for t in tasks[:used])),
            "partition": ({"shard_index": opts.shard_index, "num_shards": opts.num_shards}
                          if opts.num_shards > 1 else None),
            "workers": opts.workers,
            "max_docs": opts.max_docs,
            "settings_hash": settings_hash,
            "elapsed_s": round(elapsed, 3),
            "docs_per_s": round(docs / max(elapsed, 1e-9), 1),
            "tokens_per_s": round(tokens / max(elapsed, 1e-9), 1),
        }
        atomic_write_json(summary_file, summary)
        summaries[key] = summary
    if not opts.keep_shards:
        shutil.rmtree(shard_dir, ignore_errors=True)
    return summaries

