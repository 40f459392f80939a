"""Megatron's train/valid/test split of a dataset's documents from a string like "949,50,1"."""

from __future__ import annotations

import re

from .errors import DataError

SPLIT_NAMES = ("train", "valid", "test")


def parse_split(split: str) -> list[float]:
    """"949,50,1" -> [0.949, 0.05, 0.001]; missing trailing parts are 0 (as Megatron)."""
    parts = [p for p in re.split(r"[,/ ]+", str(split).strip()) if p]
    try:
        values = [float(p) for p in parts]
    except ValueError:
        raise DataError(f"--split {split!r}: expected up to three numbers like 949,50,1") from None
    if not 1 <= len(values) <= 3 or any(v < 0 for v in values) or sum(values) <= 0:
        raise DataError(f"--split {split!r}: expected 1-3 non-negative numbers, not all zero")
    values += [0.0] * (3 - len(values))
    total = sum(values)
    return [v / total for v in values]


def split_ranges(split: str, num_documents: int) -> list[tuple[int, int] | None]:
    """Document ranges ``[begin, end)`` per split, None for a split of weight 0.

    Same arithmetic as megatron-core: cumulative book-ends rounded to whole documents, so the
    three ranges tile ``[0, num_documents)`` exactly.
    """
    fractions = parse_split(split)
    ranges: list[tuple[int, int] | None] = []
    low = 0.0
    for fraction in fractions:
        high = low + fraction
        if fraction == 0:
            ranges.append(None)
        else:
            ranges.append((int(round(low * float(num_documents))),
                           int(round(high * float(num_documents)))))
        low = high
    return ranges
