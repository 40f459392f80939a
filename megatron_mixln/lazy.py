"""Lazy package exports: a package's public names, imported from their modules on first use (PEP 562).

Keeps `import megatron_mixln.data` (and `.checkpoint`) free of torch until a name that needs it is used.
"""
from __future__ import annotations

import importlib
from typing import Any, Callable


def lazy_exports(package: str, exports: dict[str, str], namespace: dict) -> tuple[Callable, Callable]:
    """-> (__getattr__, __dir__) for `package`, whose name N lives in its submodule `exports[N]`; a resolved
    name is cached in the package's `namespace` (its globals()). Unknown names raise AttributeError."""
    def __getattr__(name: str) -> Any:
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f".{exports[name]}", package), name)
        namespace[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted(exports)

    return __getattr__, __dir__
