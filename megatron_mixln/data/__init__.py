"""Data pipeline: Megatron indexed datasets, tokenizers, C4 preprocessing, GPT samples, sampler.

Public API (the training engine imports these)::

    from megatron_mixln.data import (
        IndexedDataset, IndexedDatasetWriter, build_tokenizer, parse_data_path,
        build_train_valid_test_datasets, PretrainingSampler)

Names are resolved lazily so that the preprocessing tools (and their worker processes) do not pay
for importing torch, which only the Dataset classes need.
"""

from __future__ import annotations

from megatron_mixln.lazy import lazy_exports

_EXPORTS = {
    "DataError": "errors", "IndexedDatasetError": "errors", "BadInputError": "errors",
    "TokenizerError": "errors",
    "IndexedDataset": "indexed_dataset", "IndexedDatasetWriter": "indexed_writer",
    "merge_indexed_datasets": "indexed_writer", "optimal_dtype": "indexed_dataset",
    "Tokenizer": "tokenizer", "build_tokenizer": "tokenizer", "check_vocab": "tokenizer",
    "parse_split": "split", "split_ranges": "split",
    "PretrainingSampler": "sampler",
    "GPTDataset": "gpt_dataset", "DocumentDataset": "document_dataset", "build_gpt_indices": "gpt_dataset",
    "BlendedDataset": "blended_dataset", "build_blending_indices": "blended_dataset",
    "build_exhaustive_blending_indices": "blended_dataset",
    "parse_data_path": "builder", "build_train_valid_test_datasets": "builder",
    "check_data_vocab": "builder",
    "PreprocessOptions": "preprocess", "run_preprocess": "preprocess",
    "output_prefix_for": "preprocess",
}

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
