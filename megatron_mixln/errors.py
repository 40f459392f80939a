"""How the project fails: the exit codes, one exception for bad input, and the wrapper every entry point uses.

| code | meaning                                                                                   |
|------|-------------------------------------------------------------------------------------------|
| 0    | done (finished; preempted with a checkpoint saved; stopped at --exit-interval/-duration)   |
| 1    | finished, but the answer is "no" (a sweep with unfinished runs, a plan that does not fit) |
| 2    | bad input: a flag, config file or input file; one line on stderr names it                 |
| 3    | training diverged (--max-bad-steps non-finite steps in a row)                             |
| 4    | the rendezvous failed (MASTER_ADDR / MASTER_PORT)                                         |
| 124  | hung: no progress for --hang-timeout seconds (stacks dumped), as coreutils' timeout       |
| 130  | aborted by a second Ctrl-C (128 + SIGINT, as a shell reports it); nothing saved           |

docs/errors.md has the same table with the entry points that use each code.
"""
from __future__ import annotations

import argparse
import os
import re
import sys

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_DIVERGED, EXIT_RENDEZVOUS, EXIT_HANG, EXIT_INTERRUPTED = 0, 1, 2, 3, 4, 124, 130


class MixlnError(Exception):
    """An expected failure whose message is the whole story (printed as one line, no traceback)."""
    exit_code = EXIT_USAGE


class UsageError(MixlnError, ValueError):
    """A bad flag, config file or input, detected before any expensive work. The message names the
    flag (--train-iters) or file, what is wrong, and what to do."""
    exit_code = EXIT_USAGE


class RendezvousError(MixlnError, RuntimeError):
    """The processes of a run could not meet (MASTER_ADDR / MASTER_PORT unreachable, a peer missing)."""
    exit_code = EXIT_RENDEZVOUS


def flag_names(message: str, fields) -> str:
    """Spell each config field named in `message` as its flag: num_layers -> --num-layers."""
    names = sorted(fields, key=len, reverse=True)
    if not names:
        return message
    pattern = re.compile(r"(?<![\w-])(" + "|".join(map(re.escape, names)) + r")(?![\w])")
    return pattern.sub(lambda m: "--" + m[1].replace("_", "-"), message)


def tool_name(prog: str) -> str:
    """The short name errors are prefixed with: `python tools/convert_to_hf.py` -> convert_to_hf,
    `python -m megatron_mixln.pretrain` -> pretrain."""
    last = os.path.basename(prog.split()[-1]) if prog.split() else prog
    return last.removesuffix(".py").rsplit(".", 1)[-1]


def error_line(prog: str, message: str) -> str:
    """`prog: error: message` on one line (argparse's own format); other ranks than 0 are named."""
    rank = os.environ.get("RANK")
    prefix = f"[rank {rank}] " if rank not in (None, "0") else ""
    text = " ".join(str(message).split("\n"))
    return f"{prefix}{prog}: error: {text}"


def print_error(prog: str, message: str) -> None:
    print(error_line(prog, message), file=sys.stderr, flush=True)


class ArgumentParser(argparse.ArgumentParser):
    """argparse with Megatron-LM's allow_abbrev=False, whose errors are one line (no usage banner) and exit 2."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message):
        print_error(tool_name(self.prog), f"{message}{self._did_you_mean(message)} (see --help)")
        sys.exit(EXIT_USAGE)

    def _did_you_mean(self, message: str) -> str:
        """For `unrecognized arguments: --norm-postion mix`, the closest real flag (difflib, cutoff 0.75)."""
        if not message.startswith("unrecognized arguments:"):
            return ""
        import difflib

        flags = [o for a in self._actions for o in a.option_strings if a.help != argparse.SUPPRESS]
        unknown = [w.split("=")[0] for w in message.split(":", 1)[1].split() if w.startswith("--")]
        close = [m[0] for w in unknown for m in [difflib.get_close_matches(w, flags, n=1, cutoff=0.75)] if m]
        return f" (did you mean {', '.join(close)}?)" if close else ""


def run_tool(main, prog: str, argv=None, bad_input: tuple = ()) -> int:
    """main(argv) -> exit code, with every MixlnError (and the `bad_input` exception types, e.g. the
    OSError of a missing file) printed as one `prog: error: ...` line and turned into its exit code."""
    try:
        return main(argv)
    except MixlnError as exc:
        print_error(prog, str(exc))
        return exc.exit_code
    except bad_input as exc:
        print_error(prog, str(exc))
        return EXIT_USAGE
