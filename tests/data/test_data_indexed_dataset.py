"""The .bin/.idx reader and writer: exact bytes of the format, round trips for both token dtypes,
compatibility both ways with megatron-core, merging, and clear errors for broken files."""

from __future__ import annotations

import os
import pickle
import struct

import numpy as np
import pytest
import torch

from megatron_mixln.data import IndexedDataset, IndexedDatasetWriter, merge_indexed_datasets
from megatron_mixln.data.errors import IndexedDatasetError

from data_testlib import file_bytes

# megatron-core warns about missing Apex/Transformer Engine and numpy 2 on import: not ours.
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")


def random_docs(dtype, count=150, seed=0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    high = np.iinfo(dtype).max
    return [rng.integers(0, high, size=n, endpoint=True).astype(np.int64)
            for n in rng.integers(0, 200, size=count)]  # includes empty documents


def write(prefix, docs, dtype) -> str:
    with IndexedDatasetWriter(str(prefix), dtype) as writer:
        for doc in docs:
            writer.add_document(doc)
    return str(prefix)


def test_layout_matches_the_specification(tmp_path):
    """Bytes written for [[1, 2, 3], [4]] in uint16, against the format spelled out by hand."""
    prefix = write(tmp_path / "tiny", [[1, 2, 3], [4]], np.uint16)
    expected_idx = (b"MMIDIDX\x00\x00" + struct.pack("<Q", 1) + struct.pack("<B", 8)
                    + struct.pack("<QQ", 2, 3) + struct.pack("<2i", 3, 1)
                    + struct.pack("<2q", 0, 6) + struct.pack("<3q", 0, 1, 2))
    assert file_bytes(prefix + ".idx") == expected_idx
    assert file_bytes(prefix + ".bin") == struct.pack("<4H", 1, 2, 3, 4)


@pytest.mark.parametrize("dtype", [np.uint16, np.int32])
def test_round_trip(tmp_path, dtype):
    docs = random_docs(dtype)
    prefix = write(tmp_path / "rt", docs, dtype)
    ds = IndexedDataset(prefix, full_check=True)
    assert ds.dtype == np.dtype(dtype) and len(ds) == len(docs) == ds.num_documents
    for i, doc in enumerate(docs):
        assert np.array_equal(ds[i], doc)
    assert np.array_equal(ds.sequence_lengths, [len(d) for d in docs])
    assert np.array_equal(ds.document_indices, np.arange(len(docs) + 1))
    longest = int(np.argmax(ds.sequence_lengths))
    assert np.array_equal(ds.get(longest, 5, 7), docs[longest][5:12])
    assert np.array_equal(ds.get(longest, 5), docs[longest][5:])
    assert os.path.getsize(prefix + ".bin") == sum(map(len, docs)) * np.dtype(dtype).itemsize
    # The batched writer path gives the same bytes.
    with IndexedDatasetWriter(str(tmp_path / "batched"), dtype) as writer:
        writer.add_documents(np.concatenate(docs).astype(dtype), np.array([len(d) for d in docs]))
    for ext in (".bin", ".idx"):
        assert file_bytes(prefix + ext) == file_bytes(str(tmp_path / "batched") + ext)
    clone = pickle.loads(pickle.dumps(ds))  # DataLoader workers re-open the maps
    assert np.array_equal(clone[longest], docs[longest])


@pytest.mark.parametrize("dtype", [np.uint16, np.int32])
def test_compatible_with_megatron_core_both_ways(tmp_path, dtype):
    from megatron.core.datasets.indexed_dataset import IndexedDataset as CoreDataset
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    docs = [d for d in random_docs(dtype, seed=1) if len(d)]
    ours = write(tmp_path / "ours", docs, dtype)
    core = str(tmp_path / "core")
    builder = IndexedDatasetBuilder(core + ".bin", dtype=dtype)
    for doc in docs:
        builder.add_document(torch.from_numpy(doc), [len(doc)])
    builder.finalize(core + ".idx")
    for ext in (".bin", ".idx"):
        assert file_bytes(ours + ext) == file_bytes(core + ext), ext

    theirs_reading_ours = CoreDataset(ours)
    assert len(theirs_reading_ours) == len(docs)
    for i, doc in enumerate(docs):
        assert np.array_equal(theirs_reading_ours[i], doc)

    # Megatron with sentence splitting: several sequences per document.
    split = str(tmp_path / "core_split")
    builder = IndexedDatasetBuilder(split + ".bin", dtype=dtype)
    for doc in docs[:20]:
        builder.add_item(torch.from_numpy(doc[: len(doc) // 2]))
        builder.add_item(torch.from_numpy(doc[len(doc) // 2:]))
        builder.end_document()
    builder.finalize(split + ".idx")
    ours_reading_theirs = IndexedDataset(split, full_check=True)
    assert len(ours_reading_theirs) == 40 and ours_reading_theirs.num_documents == 20
    assert np.array_equal(ours_reading_theirs.document_indices, np.arange(0, 41, 2))
    for i, doc in enumerate(docs[:20]):
        joined = np.concatenate([ours_reading_theirs[2 * i], ours_reading_theirs[2 * i + 1]])
        assert np.array_equal(joined, doc)


def test_merge_and_max_documents(tmp_path):
    parts = [random_docs(np.uint16, count=n, seed=s) for n, s in ((30, 2), (1, 3), (45, 4))]
    prefixes = [write(tmp_path / f"part{i}", docs, np.uint16) for i, docs in enumerate(parts)]
    everything = [d for docs in parts for d in docs]
    docs, tokens = merge_indexed_datasets(prefixes, str(tmp_path / "all"))
    merged = IndexedDataset(str(tmp_path / "all"), full_check=True)
    assert (docs, tokens) == (len(everything), sum(map(len, everything)))
    assert all(np.array_equal(merged[i], d) for i, d in enumerate(everything))
    merge_indexed_datasets(prefixes, str(tmp_path / "first40"), max_documents=40)
    first = IndexedDataset(str(tmp_path / "first40"), full_check=True)
    assert len(first) == 40 and all(np.array_equal(first[i], everything[i]) for i in range(40))
    write(tmp_path / "wide", [[1, 2]], np.int32)
    with pytest.raises(IndexedDatasetError, match="wide.*dtype"):
        merge_indexed_datasets([prefixes[0], str(tmp_path / "wide")], str(tmp_path / "bad"))
    assert not os.path.exists(str(tmp_path / "bad") + ".bin")


def test_writer_leaves_nothing_when_aborted(tmp_path):
    with pytest.raises(RuntimeError):
        with IndexedDatasetWriter(str(tmp_path / "x"), np.uint16) as writer:
            writer.add_document([1, 2, 3])
            raise RuntimeError("killed")
    assert os.listdir(tmp_path) == []


def test_writer_refuses_ids_that_do_not_fit(tmp_path):
    with IndexedDatasetWriter(str(tmp_path / "x"), np.uint16) as writer:
        with pytest.raises(IndexedDatasetError, match="70000.*uint16"):
            writer.add_document([1, 70000])
        with pytest.raises(IndexedDatasetError, match="-1"):
            writer.add_document(np.array([-1]))


def _corrupt(prefix: str, ext: str, edit) -> None:
    data = bytearray(file_bytes(prefix + ext))
    data = edit(data)
    with open(prefix + ext, "wb") as fh:
        fh.write(bytes(data))


@pytest.mark.parametrize("case, ext, edit, message", [
    ("truncated_bin", ".bin", lambda d: d[:-2], r"\.bin: \d+ bytes, but .*truncated"),
    ("truncated_idx", ".idx", lambda d: d[:-8], r"\.idx: \d+ bytes, but its header .*truncated"),
    ("short_idx", ".idx", lambda d: d[:20], r"\.idx: 20 bytes, shorter than the 34-byte header"),
    ("wrong_magic", ".idx", lambda d: b"NOTANIDX!" + d[9:], r"wrong magic"),
    ("wrong_version", ".idx", lambda d: d[:9] + struct.pack("<Q", 2) + d[17:], r"version 2"),
    ("bad_dtype", ".idx", lambda d: d[:17] + b"\x63" + d[18:], r"unknown dtype code 99"),
])
def test_broken_files_are_named(tmp_path, case, ext, edit, message):
    prefix = write(tmp_path / case, random_docs(np.uint16, count=20), np.uint16)
    _corrupt(prefix, ext, edit)
    with pytest.raises(IndexedDatasetError, match=message) as info:
        IndexedDataset(prefix)
    assert case in str(info.value)  # the message names the file


def test_mismatched_pair_and_missing_files(tmp_path):
    a = write(tmp_path / "a", random_docs(np.uint16, count=20, seed=5), np.uint16)
    b = write(tmp_path / "b", random_docs(np.uint16, count=20, seed=6), np.uint16)
    os.replace(b + ".bin", a + ".bin")
    with pytest.raises(IndexedDatasetError, match="different runs"):
        IndexedDataset(a)
    with pytest.raises(IndexedDatasetError, match=r"b\.bin: not found"):
        IndexedDataset(b)
    with pytest.raises(IndexedDatasetError, match=r"nothere\.idx: not found"):
        IndexedDataset(str(tmp_path / "nothere"))


def test_missing_prefix_suggests_the_preprocessed_name(tmp_path):
    """preprocess_c4 --output-prefix P writes P_<key>_document: given P, the error names that."""
    made = write(tmp_path / "train_text_document", random_docs(np.uint16, count=5), np.uint16)
    write(tmp_path / "train_url_document", random_docs(np.uint16, count=5), np.uint16)
    with pytest.raises(IndexedDatasetError) as err:
        IndexedDataset(str(tmp_path / "train"))
    assert str(err.value).endswith(f"did you mean {made} or {tmp_path / 'train'}_url_document?")
    with pytest.raises(IndexedDatasetError, match=rf"did you mean {made}\? \(the prefix, without \.bin\)"):
        IndexedDataset(made + ".bin")
    with pytest.raises(IndexedDatasetError) as err:
        IndexedDataset(str(tmp_path / "other"))
    assert "did you mean" not in str(err.value)


def test_full_check_catches_an_inconsistent_pointer(tmp_path):
    prefix = write(tmp_path / "p", random_docs(np.uint16, count=20, seed=7), np.uint16)
    n = 20
    pointer_5 = 34 + 4 * n + 8 * 5
    _corrupt(prefix, ".idx", lambda d: d[:pointer_5] + struct.pack("<q", 2) + d[pointer_5 + 8:])
    IndexedDataset(prefix)  # the O(1) checks cannot see a middle pointer
    with pytest.raises(IndexedDatasetError, match="pointer of sequence 5"):
        IndexedDataset(prefix, full_check=True)
