#!/usr/bin/env python
"""Benchmark tools/preprocess_c4.py against the naive loop, at two input sizes.

    python bench/preprocess.py                       # ~6 MB and 4x that, workers 1 and 2
    python bench/preprocess.py --base-mb 10 --scale 3 --workers 1 2 4 --repeat 3

The baseline is the plain single-process loop most scripts use: read a line, json.loads, encode it,
append the ids to a Python list, write everything at the end. Each configuration runs in its own
process; its peak memory is the largest sum of RSS over it and its children (sampled every 20 ms,
so shared pages of forked workers count more than once: an upper bound). MB/s counts the
uncompressed JSON bytes; "CPU s" is the user+sys time of the program and its workers, which
separates our per-document cost from the wall-clock noise of a shared machine. The larger input repeats the smaller one's documents, so any growth of
peak memory with input size shows up directly. Both programs' outputs are checked to be equal.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

REPO = os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, REPO)


# -- the two programs being measured (run as child processes) ---------------------------------
def run_baseline(inputs: list[str], tokenizer: str, output: str) -> dict:
    import numpy as np
    import sentencepiece

    from megatron_mixln.data.indexed_writer import IndexedDatasetWriter

    started = time.time()
    sp = sentencepiece.SentencePieceProcessor(model_file=tokenizer)
    docs: list[list[int]] = []
    for path in inputs:
        with gzip.open(path, "rb") as fh:
            for line in fh:
                ids = sp.encode(json.loads(line)["text"])
                docs.append(ids + [sp.eos_id()])
    with IndexedDatasetWriter(output, np.uint16) as writer:
        for ids in docs:
            writer.add_document(ids)
    return {"elapsed": time.time() - started, "docs": len(docs), "tokens": sum(map(len, docs))}


def run_pipeline(inputs: list[str], tokenizer: str, output: str, workers: int) -> dict:
    from megatron_mixln.data.preprocess import PreprocessOptions, run_preprocess

    started = time.time()
    summary = run_preprocess(PreprocessOptions(
        output_prefix=output, tokenizer=tokenizer, inputs=inputs, append_eod=True,
        workers=workers, progress=False))["text"]
    return {"elapsed": time.time() - started, "docs": summary["documents"],
            "tokens": summary["tokens"]}


# -- measuring ------------------------------------------------------------------------------
def measure(child_args: list[str]) -> dict:
    """Run this script in child mode; returns its report plus the peak RSS of its process tree."""
    import psutil

    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, __file__, "--child", *child_args],
                            stdout=subprocess.PIPE, text=True, env=env)
    parent, peak = psutil.Process(proc.pid), 0
    while proc.poll() is None:
        try:
            tree = [parent] + parent.children(recursive=True)
            peak = max(peak, sum(p.memory_info().rss for p in tree if p.is_running()))
        except psutil.Error:
            pass
        time.sleep(0.02)
    out = proc.stdout.read()
    if proc.returncode:
        raise SystemExit(f"benchmark child failed: {child_args}")
    report = json.loads(out.strip().splitlines()[-1])
    report["peak_rss_mb"] = peak / 2**20
    return report


def json_bytes(paths: list[str]) -> int:
    total = 0
    for path in paths:
        with gzip.open(path, "rb") as fh:
            while block := fh.read(1 << 20):
                total += len(block)
    return total


def make_inputs(work: str, base_mb: float, scale: int) -> tuple[list[str], list[str]]:
    from megatron_mixln.data.sample_corpus import CorpusOptions, make_sample_corpus

    small = make_sample_corpus(CorpusOptions(os.path.join(work, "small"), target_mb=base_mb,
                                             train_shards=4, valid_shards=0))["train"]
    large_dir = os.path.join(work, "large")
    os.makedirs(large_dir, exist_ok=True)
    large = []
    for i in range(scale * len(small)):
        path = os.path.join(large_dir, f"c4-train.{i:05d}-of-{scale * len(small):05d}.json.gz")
        shutil.copy(small[i % len(small)], path)
        large.append(path)
    return small, large


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("--base-mb", type=float, default=6.0, help="size of the smaller input")
    p.add_argument("--scale", type=int, default=4, help="the larger input is this many times it")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--vocab-size", type=int, default=8000)
    p.add_argument("--repeat", type=int, default=2, help="runs per configuration; the fastest "
                   "is reported (peak memory: the largest)")
    p.add_argument("--work-dir", help="keep inputs/outputs here (default: a temporary dir)")
    p.add_argument("--child", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        mode, tokenizer, output, workers, *inputs = a.child
        report = (run_baseline(inputs, tokenizer, output) if mode == "baseline"
                  else run_pipeline(inputs, tokenizer, output, int(workers)))
        import resource

        usage = [resource.getrusage(who) for who in (resource.RUSAGE_SELF,
                                                     resource.RUSAGE_CHILDREN)]
        report["cpu_s"] = sum(u.ru_utime + u.ru_stime for u in usage)  # incl. joined workers
        print(json.dumps(report))
        return 0

    from megatron_mixln.data.tokenizer_training import TokenizerTrainOptions, train_tokenizer

    work = a.work_dir or tempfile.mkdtemp(prefix="bench_preprocess_")
    small, large = make_inputs(work, a.base_mb, a.scale)
    spm = train_tokenizer(TokenizerTrainOptions(inputs=small, output_prefix=os.path.join(work, "spm"),
                                                vocab_size=a.vocab_size, num_threads=2))
    rows = []
    for label, inputs in (("small", small), ("large", large)):
        mb = json_bytes(inputs) / 2**20
        configs = [("baseline loop", "baseline", 1)] + [
            (f"preprocess_c4 -w{w}", "pipeline", w) for w in a.workers]
        outputs = []
        for name, mode, workers in configs:
            output = os.path.join(work, f"out_{label}_{mode}{workers}")
            runs = [measure([mode, spm, output, str(workers), *inputs]) for _ in range(a.repeat)]
            r = min(runs, key=lambda x: x["elapsed"])  # the least disturbed run on a shared box
            r["peak_rss_mb"] = max(x["peak_rss_mb"] for x in runs)
            prefix = output if mode == "baseline" else output + "_text_document"
            outputs.append(prefix)
            rows.append((f"{label} {mb:.1f} MB", name, r["docs"] / r["elapsed"], mb / r["elapsed"],
                         r["tokens"] / r["elapsed"], r["peak_rss_mb"], r["elapsed"],
                         r["cpu_s"]))
        reference = [open(outputs[0] + ext, "rb").read() for ext in (".bin", ".idx")]
        for prefix in outputs[1:]:
            assert [open(prefix + ext, "rb").read() for ext in (".bin", ".idx")] == reference, \
                f"{prefix} differs from the baseline's output"

    header = ("input", "program", "docs/s", "MB/s", "tokens/s", "peak RSS MB", "seconds",
              "CPU s")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        print(f"| {row[0]} | {row[1]} | {row[2]:,.0f} | {row[3]:.2f} | {row[4]:,.0f} | "
              f"{row[5]:,.0f} | {row[6]:.2f} | {row[7]:.2f} |")
    base = {r[0]: r[2] for r in rows if r[1] == "baseline loop"}
    for row in rows:
        if row[1] != "baseline loop":
            print(f"{row[0]}, {row[1]}: {row[2] / base[row[0]]:.2f}x the baseline")
    print(f"(cpu count {os.cpu_count()}, load average {os.getloadavg()[0]:.1f}; "
          f"CPU s = user+sys of the program and its workers, the whole run incl. imports)")
    if not a.work_dir:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
