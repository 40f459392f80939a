"""How the project fails: one exception for bad input, named by its flag or file."""
from __future__ import annotations


class UsageError(ValueError):
    """A bad flag, config file or input, detected before training starts. The message names it."""
