#!/usr/bin/env python
"""Checkpoint manifest cost: xxh3-128 (what megatron_mixln.manifest uses) vs sha256 over a
file of --mib MiB of random bytes (read back from the page cache, as right after a save), and the
implied per-rank time for a 7B ZeRO-3 checkpoint spread over N ranks.

  python bench/checkpoint_checksum.py [--mib 512] [--ranks 32]
"""
from __future__ import annotations

import argparse
import hashlib
import os
import tempfile
import time

from megatron_mixln.manifest import file_checksum

PARAMS_7B = 6.74e9
BYTES_PER_PARAM = 2 + 4 + 4 + 4  # bf16 weights + fp32 master weights + Adam exp_avg + exp_avg_sq


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(8 << 20):
            h.update(chunk)
    return h.hexdigest()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("--mib", type=int, default=512)
    p.add_argument("--ranks", type=int, default=32)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "shard.bin")
        with open(path, "wb") as fh:
            for _ in range(args.mib // 64):
                fh.write(os.urandom(64 << 20))
        size = os.path.getsize(path)
        per_rank = PARAMS_7B * BYTES_PER_PARAM / args.ranks
        for name, fn in (("xxh3_128", file_checksum), ("sha256", _sha256)):
            fn(path)  # warm the page cache
            t0 = time.perf_counter()
            fn(path)
            rate = size / (time.perf_counter() - t0)
            print(f"{name:9s} {rate / 2**30:6.2f} GiB/s -> 7B checkpoint ({PARAMS_7B * BYTES_PER_PARAM / 1e9:.0f} GB) "
                  f"over {args.ranks} ranks: {per_rank / rate:6.1f} s per rank")


if __name__ == "__main__":
    main()
