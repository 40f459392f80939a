"""Exceptions of the data pipeline.

Every problem with user data (a corpus line, an index file, a tokenizer, a CLI argument) is raised
as a ``DataError`` whose message names the file (and line or field) at fault, so that tools can
print it as one clean line instead of a traceback.
"""
from megatron_mixln.errors import UsageError


class DataError(UsageError):
    """A problem with user-supplied data or settings; the message names the file/field."""


class IndexedDatasetError(DataError):
    """A ``.bin``/``.idx`` pair that is missing, truncated, foreign or inconsistent."""


class BadInputError(DataError):
    """A corpus line that cannot be used (raised only in ``--strict`` mode; counted otherwise)."""


class TokenizerError(DataError):
    """A tokenizer that cannot be loaded or disagrees with the data or the model."""
