"""--sample-mode truncate-pad: one document per sample, truncated or right-padded (DocumentDataset)."""
import numpy as np
import pytest

from megatron_mixln.data import DataError, DocumentDataset, IndexedDataset, IndexedDatasetWriter


@pytest.fixture()
def docs(tmp_path):
    rng = np.random.default_rng(0)
    lengths = [3, 9, 12, 1, 20, 7]
    arrays = [rng.integers(5, 200, n) for n in lengths]
    with IndexedDatasetWriter(str(tmp_path / "d"), dtype=np.uint16) as w:
        for a in arrays:
            w.add_document(a)
    return IndexedDataset(str(tmp_path / "d")), arrays


def test_each_sample_is_one_document_truncated_or_padded(docs):
    indexed, arrays = docs
    ds = DocumentDataset(indexed, (1, 6), seq_length=8, seed=3, num_samples=None, pad_id=0)
    assert len(ds) == 5 and sorted(ds.document_index.tolist()) == [1, 2, 3, 4, 5]  # one epoch, each once
    for i in range(len(ds)):
        doc = arrays[int(ds.document_index[i])]
        item = ds[i]
        n = min(len(doc), 9)
        assert item["num_tokens"] == n == ds.num_tokens(i)
        assert item["tokens"].shape == (9,) and item["tokens"].dtype == np.int64
        assert item["tokens"][:n].tolist() == doc[:n].tolist()  # text past seq+1 tokens is dropped
        assert item["tokens"][n:].tolist() == [0] * (9 - n)
    # Same seed, same order; another seed, another order (epochs tiled for more samples).
    again = DocumentDataset(indexed, (1, 6), 8, 3, None)
    assert again.document_index.tolist() == ds.document_index.tolist()
    more = DocumentDataset(indexed, (1, 6), 8, 3, 12)
    assert len(more) == 15 and np.bincount(more.document_index, minlength=6)[1:].tolist() == [3] * 5
    with pytest.raises(DataError, match="split"):
        DocumentDataset(indexed, (6, 6), 8, 3, None)
