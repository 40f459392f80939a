"""GPT sample-index builds at C4 scale: this stack against megatron-core, side by side.

Writes a synthetic C4-shaped indexed dataset (document lengths drawn from a log-normal fitted to
C4-en under the T5 tokenizer: ~470 tokens per document on average, median ~290; uint16 tokens; the
``.bin`` a sparse file, so 100M documents take ~2 GB of disk for the ``.idx`` only), then builds the
train split's document/sample/shuffle indices with each stack in its own fresh process (cold: empty
cache directory; then a reload from that cache in another process), and prints seconds, peak RSS
and bytes per array side by side, and whether every array is equal (values and dtypes).

    python bench/data_index.py --documents 1000000                  # quick check (~1 min)
    python bench/data_index.py --documents 100000000 --keep-dataset # the paper's 7B run

The default sample count is the paper's 7B run: 13,000 steps x 512 sequences of 256 tokens (less
than one epoch of 100M documents, so the build covers one whole epoch, as in Megatron).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MEAN_TOKENS, SIGMA = 470.0, 1.0  # log-normal: mean 470 tokens, median exp(mu) ~ 285
ARRAYS = ("document_index", "sample_index", "shuffle_index")


def write_synthetic(prefix: str, documents: int, seed: int = 0) -> int:
    """``prefix.idx`` with C4-like lengths and a sparse ``prefix.bin`` of the right size; returns
    the token count. Written with the data package's streaming index writer (temp, then rename)."""
    from megatron_mixln.data.indexed_writer import write_index

    chunk = 1 << 22
    mu = np.log(MEAN_TOKENS) - SIGMA ** 2 / 2

    def lengths():
        rng = np.random.default_rng(seed)
        for c0 in range(0, documents, chunk):
            n = min(chunk, documents - c0)
            yield np.clip(rng.lognormal(mu, SIGMA, n), 1, 200_000).astype(np.int32)

    def doc_bounds():
        for c0 in range(0, documents + 1, chunk):
            yield np.arange(c0, min(c0 + chunk, documents + 1), dtype=np.int64)

    tokens = sum(int(part.sum(dtype=np.int64)) for part in lengths())
    write_index(prefix + ".idx", np.uint16, documents, documents + 1, lengths, doc_bounds)
    with open(prefix + ".bin", "wb") as fh:
        fh.truncate(2 * tokens)  # sparse: no blocks written
    return tokens


def _child(stack: str, prefix: str, cache: str, seq: int, seed: int, samples: int) -> None:
    """Build (or reload) the train indices with one stack; print one JSON line of figures."""
    import resource

    def cpu() -> float:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return usage.ru_utime + usage.ru_stime

    t0 = time.perf_counter()
    if stack == "mixln":
        from megatron_mixln.data import GPTDataset, IndexedDataset

        indexed = IndexedDataset(prefix)
        imported, cpu0 = time.perf_counter(), cpu()
        ds = GPTDataset(indexed, (0, len(indexed)), seq, seed, samples, cache_dir=cache)
    else:
        import logging

        logging.disable(logging.WARNING)
        from megatron.core.datasets.blended_megatron_dataset_builder import (
            BlendedMegatronDatasetBuilder)
        from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

        class Tokenizer:  # what GPTDatasetConfig reads from a tokenizer
            vocab_size, eod, pad = 32128, 1, 0
            unique_identifiers = {"class": "bench"}

        config = GPTDatasetConfig(
            random_seed=seed, sequence_length=seq, blend=([prefix], None), split="100,0,0",
            reset_position_ids=False, reset_attention_mask=False, eod_mask_loss=False,
            tokenizer=Tokenizer(), path_to_cache=cache)
        imported, cpu0 = time.perf_counter(), cpu()
        ds = BlendedMegatronDatasetBuilder(GPTDataset, [samples, 0, 0], lambda: True, config).build()[0]
    seconds, cpu_seconds = time.perf_counter() - imported, cpu() - cpu0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"seconds": seconds, "cpu_seconds": cpu_seconds, "import_seconds": imported - t0,
                      "peak_rss_mb": peak / 1024, "samples": len(ds),
                      "bytes": {n: int(np.asarray(getattr(ds, n)).nbytes) for n in ARRAYS},
                      "dtypes": {n: str(np.asarray(getattr(ds, n)).dtype) for n in ARRAYS}}))


def run_child(stack: str, prefix: str, cache: str, args) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", stack, "--prefix", prefix,
           "--cache", cache, "--seq-length", str(args.seq_length), "--seed", str(args.seed),
           "--samples", str(args.samples)]
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def cached_files(cache: str) -> dict[str, str]:
    found = {}
    for name in ARRAYS:
        paths = glob.glob(os.path.join(cache, "**", f"*{name}.npy"), recursive=True)
        assert len(paths) == 1, (cache, name, paths)
        found[name] = paths[0]
    return found


def arrays_equal(a_path: str, b_path: str, chunk: int = 1 << 24) -> bool:
    a, b = np.load(a_path, mmap_mode="r"), np.load(b_path, mmap_mode="r")
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return all(np.array_equal(a[i:i + chunk], b[i:i + chunk]) for i in range(0, len(a), chunk))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--documents", type=int, default=1_000_000)
    parser.add_argument("--seq-length", type=int, default=256)
    parser.add_argument("--samples", type=int, default=13_000 * 512,
                        help="train samples (default: the paper's 7B run, 13,000 steps x 512)")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--workdir", default=None, help="where the dataset and caches go (default: a temp dir)")
    parser.add_argument("--keep-dataset", action="store_true", help="reuse/keep the synthetic dataset")
    parser.add_argument("--stacks", nargs="+", default=["megatron-core", "mixln"])
    parser.add_argument("--child", choices=["mixln", "megatron-core"], help=argparse.SUPPRESS)
    parser.add_argument("--prefix", help=argparse.SUPPRESS)
    parser.add_argument("--cache", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(args.child, args.prefix, args.cache, args.seq_length, args.seed, args.samples)
        return

    workdir = args.workdir or tempfile.mkdtemp(prefix="data_index_")
    os.makedirs(workdir, exist_ok=True)
    prefix = os.path.join(workdir, f"c4like_{args.documents}")
    t0 = time.perf_counter()
    if args.keep_dataset and os.path.isfile(prefix + ".idx"):
        tokens = os.path.getsize(prefix + ".bin") // 2
    else:
        tokens = write_synthetic(prefix, args.documents)
    print(f"dataset: {args.documents:,} documents, {tokens:,} tokens ({tokens / args.documents:.0f}/doc), "
          f".idx {os.path.getsize(prefix + '.idx') / 2**20:,.0f} MiB, .bin sparse {2 * tokens / 2**30:,.1f} GiB "
          f"({time.perf_counter() - t0:.1f} s to write); seq_length {args.seq_length}, "
          f"{args.samples:,} train samples asked")
    results, caches = {}, {}
    try:
        for stack in args.stacks:
            caches[stack] = os.path.join(workdir, f"cache_{stack}")
            subprocess.run(["rm", "-rf", caches[stack]], check=True)
            cold = run_child(stack, prefix, caches[stack], args)
            warm = run_child(stack, prefix, caches[stack], args)
            results[stack] = (cold, warm)
        names = list(results)
        rows = [("cold build CPU s", lambda c, w: f"{c['cpu_seconds']:.1f}"),
                ("cold build wall s", lambda c, w: f"{c['seconds']:.1f}"),
                ("cold peak RSS MiB", lambda c, w: f"{c['peak_rss_mb']:,.0f}"),
                ("cached reload CPU s", lambda c, w: f"{w['cpu_seconds']:.1f}"),
                ("reload peak RSS MiB", lambda c, w: f"{w['peak_rss_mb']:,.0f}"),
                ("samples", lambda c, w: f"{c['samples']:,}")]
        rows += [(f"{n} MiB ({'/'.join(sorted({results[s][0]['dtypes'][n] for s in names}))})",
                  lambda c, w, n=n: f"{c['bytes'][n] / 2**20:,.0f}") for n in ARRAYS]
        print(f"\n| {'':28} | " + " | ".join(f"{s:>14}" for s in names) + " |")
        print(f"|{'-' * 30}|" + "|".join("-" * 16 for _ in names) + "|")
        for label, cell in rows:
            print(f"| {label:28} | " + " | ".join(f"{cell(*results[s]):>14}" for s in names) + " |")
        if len(names) == 2:
            a, b = (cached_files(caches[s]) for s in names)
            same = {n: arrays_equal(a[n], b[n]) for n in ARRAYS}
            print("\nequal (values and dtypes): " + ", ".join(f"{n} {same[n]}" for n in ARRAYS))
            ratio = results[names[0]][0]["cpu_seconds"] / results[names[1]][0]["cpu_seconds"]
            print(f"cold build: {names[1]} {ratio:.2f}x as fast as {names[0]} in CPU time; peak RSS "
                  f"{results[names[1]][0]['peak_rss_mb'] / results[names[0]][0]['peak_rss_mb']:.2f}x")
            if not all(same.values()):
                sys.exit(1)
    finally:
        for cache in caches.values():
            subprocess.run(["rm", "-rf", cache], check=False)
        if not args.keep_dataset:
            for ext in (".idx", ".bin"):
                if os.path.exists(prefix + ext):
                    os.remove(prefix + ext)


if __name__ == "__main__":
    main()
