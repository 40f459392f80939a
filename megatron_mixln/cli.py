"""Map typed config dataclasses onto argparse flags one to one (field_name <-> --field-name)."""
from __future__ import annotations

import argparse
import dataclasses
import types
import typing


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
        help_text = f"{f.metadata.get('help', '')} (default: {default})"
        if tp is bool:
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=help_text)
        else:
            group.add_argument(flag, type=tp, default=argparse.SUPPRESS, help=help_text, metavar=tp.__name__.upper())
    return group


def given_fields(ns: argparse.Namespace, cls) -> dict:
    """The dataclass fields present in a parsed namespace (i.e. given on the command line)."""
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    return {k: v for k, v in vars(ns).items() if k in names}


def one_line_error(parser: argparse.ArgumentParser, message: str):
    """argparse's error(), but ONE line (not the ~80-line usage block), and an unknown flag gets the closest
    real flag suggested: `error: unrecognized arguments: --norm-postion mix (did you mean --norm-position?)`."""
    import difflib

    hint = ""
    if message.startswith("unrecognized arguments:"):
        flags = [o for a in parser._actions for o in a.option_strings if a.help != argparse.SUPPRESS]
        unknown = [w.split("=")[0] for w in message.split(":", 1)[1].split() if w.startswith("--")]
        close = [m[0] for w in unknown for m in [difflib.get_close_matches(w, flags, n=1, cutoff=0.75)] if m]
        if close:
            hint = f" (did you mean {', '.join(close)}?)"
    parser.exit(2, f"{parser.prog}: error: {message}{hint}; see --help\n")
