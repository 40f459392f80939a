"""Data fingerprint: the size, mtime and xxh3-128 of each `.idx` (size and mtime of each `.bin`) of
--data-path / --valid-data-path, stored in every checkpoint's mixln_meta.json and compared on
resume: different data gives a different sample order, which breaks exact resume, so a mismatch
is an error unless --override-data-check.
"""
from __future__ import annotations

import os

from megatron_mixln.manifest import ALGORITHM, file_checksum
from megatron_mixln.training.config import TrainingConfig, UsageError


def _stat(path: str, checksum: bool) -> dict:
    st = os.stat(path)
    out = {"size": st.st_size, "mtime_ns": st.st_mtime_ns}
    if checksum:
        out[ALGORITHM] = file_checksum(path)
    return out


def data_fingerprint(cfg: TrainingConfig) -> dict | None:
    """{flag: {"weights": [...], "files": [{"prefix", "idx": {size, mtime_ns, xxh3_128}, "bin": {size,
    mtime_ns}}]}} for --data-path and --valid-data-path, or None without --data-path (datasets
    passed in directly). Reads each .idx once (xxh3-128, ~1 GB/s)."""
    if not cfg.data_path:
        return None
    from megatron_mixln.data import parse_data_path

    out = {}
    for flag, paths in (("--data-path", cfg.data_path), ("--valid-data-path", cfg.valid_data_path)):
        if not paths:
            continue
        prefixes, weights = parse_data_path(list(paths))
        out[flag] = {"weights": [float(w) for w in weights] if weights is not None else None,
                     "files": [{"prefix": p, "idx": _stat(p + ".idx", True), "bin": _stat(p + ".bin", False)}
                               for p in prefixes]}
    return out


def data_differences(saved: dict, current: dict) -> list[str]:
    """What changed between two fingerprints (empty: the same data)."""
    problems = []
    for flag in sorted(set(saved) | set(current)):
        a, b = saved.get(flag), current.get(flag)
        if a is None or b is None:
            problems.append(f"{flag}: {'not given now' if b is None else 'not given in the checkpointed run'}")
            continue
        if len(a["files"]) != len(b["files"]):
            problems.append(f"{flag}: {len(a['files'])} datasets in the checkpointed run, {len(b['files'])} now")
            continue
        if a.get("weights") != b.get("weights"):
            problems.append(f"{flag}: weights {a.get('weights')} in the checkpointed run, {b.get('weights')} now")
        for old, new in zip(a["files"], b["files"]):
            for ext in ("idx", "bin"):
                was, now = old[ext], new[ext]
                path = f"{new['prefix']}.{ext}"
                if was["size"] != now["size"]:
                    problems.append(f"{path}: {now['size']} bytes, {was['size']} when checkpointed")
                elif ALGORITHM in was and was[ALGORITHM] != now.get(ALGORITHM):
                    problems.append(f"{path}: content ({ALGORITHM}) differs from when checkpointed")
                elif was["mtime_ns"] != now["mtime_ns"]:
                    problems.append(f"{path}: modified since it was checkpointed (mtime; same size"
                                    f"{' and hash' if ext == 'idx' else ''}: if it was only copied, "
                                    "--override-data-check is safe)")
    return problems


def check_data_fingerprint(meta: dict, current: dict | None, load_dir: str, override: bool) -> str | None:
    """Raise UsageError when the checkpoint was trained on other data (unless `override`, which
    returns the warning line instead). None: same data, or nothing to compare."""
    saved = meta.get("data_fingerprint")
    if not saved or not current:
        return None
    problems = data_differences(saved, current)
    if not problems:
        return None
    text = (f"--load {load_dir} ({meta['tag']}) was trained on other data: " + "; ".join(problems)
            + ". A different sample order breaks exact resume")
    if override:
        return f"warning: {text}; resuming anyway (--override-data-check)"
    raise UsageError(text + "; pass --override-data-check to resume anyway")
