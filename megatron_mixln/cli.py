"""Map typed config dataclasses onto argparse flags one to one (field_name <-> --field-name)."""
from __future__ import annotations

import argparse
import dataclasses
import types
import typing

from megatron_mixln.errors import UsageError, flag_names


def base_type(tp):
    """int | None -> int; bool stays bool."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0] if len(args) == 1 else str
    return tp


def add_dataclass_args(parser: argparse.ArgumentParser, cls, title: str | None = None, skip=()):
    """One flag per init field. Defaults are SUPPRESSed so only flags the user gave are seen."""
    group = parser.add_argument_group(title or cls.__name__)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if not f.init or f.name in skip:
            continue
        flag = "--" + f.name.replace("_", "-")
        tp = base_type(hints[f.name])
        default = f.default if f.default is not dataclasses.MISSING else None
        help_text = f.metadata.get("help", "")
        if "default" not in help_text:  # a help text that explains its default says it once
            help_text += f" (default: {default})"
        if tp is bool:
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=help_text)
        else:
            group.add_argument(flag, type=tp, default=argparse.SUPPRESS, help=help_text, metavar=tp.__name__.upper())
    return group


def given_fields(ns: argparse.Namespace, cls) -> dict:
    """The dataclass fields present in a parsed namespace (i.e. given on the command line)."""
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    return {k: v for k, v in vars(ns).items() if k in names}


def field_names(cls) -> list[str]:
    return [f.name for f in dataclasses.fields(cls) if f.init]


def config_from_flags(cls, given: dict, preset: str | None = None):
    """cls(**given), or cls.from_preset(preset, **given). The dataclass's ValueError names a field
    (num_layers: ...); it is raised again as a UsageError naming the flag (--num-layers: ...).
    A class with `flag_defaults(given)` fills in the defaults that depend on other flags first."""
    if hasattr(cls, "flag_defaults"):
        given = cls.flag_defaults(given)
    try:
        return cls.from_preset(preset, **given) if preset else cls(**given)
    except UsageError:
        raise
    except ValueError as exc:
        raise UsageError(flag_names(str(exc), field_names(cls))) from None
