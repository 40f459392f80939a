"""Read a Slurm job script's training flags and allocation (#SBATCH --nodes / --gpus-per-node), so the
planner checks the script as it is instead of a copy of its values."""
from __future__ import annotations

import os
import re
import subprocess

from megatron_mixln.planning.layout import LayoutError

# Lines kept for bash to evaluate: plain (or exported / declared) assignments and `: "${X:=default}"`.
_ASSIGN = re.compile(r"^(?:export\s+|declare\s+(?:-\w+\s+)?)?[A-Za-z_][A-Za-z0-9_]*(?:\+?=)")
_DEFAULTS = re.compile(r"^:\s+\"?\$\{[A-Za-z_][A-Za-z0-9_]*:?=")
_ARGS = re.compile(r"^\s*args=\((.*?)^\s*\)", re.S | re.M)
_SOURCE = re.compile(r"^\s*(?:source|\.)\s+(.+?)\s*$", re.M)
_SCRIPT_DIR = re.compile(r"\$\(\s*dirname\s+\"?\$(?:0|\{BASH_SOURCE\[0\]\}|BASH_SOURCE)\"?\s*\)")
# After the array: one-line additions to it (`if [ "$BF16" = 1 ]; then args+=(--bf16); fi`, EXTRA_ARGS).
_ARGS_ADDITION = re.compile(r"^(?:if \[[^;]*\]; then args\+=\(.*\); fi|args\+=\(.*\)|read -ra \w+ <<< .*)$")


def _kept_lines(text: str, root: str = "") -> list[str]:
    out = []
    for line in text.splitlines():
        if line[:1].isspace():  # inside an if/for block: not a top-level default
            continue
        line = line.strip().replace("$(pwd)", _quote(root)) if root else line.strip()
        if (_ASSIGN.match(line) or _DEFAULTS.match(line)) and "$(" not in line and "`" not in line:
            out.append(line)
    return out


def _additions(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines()
            if _ARGS_ADDITION.match(line.strip()) and "$(" not in line and "`" not in line]


def _bash(lines: list[str], environ: dict) -> subprocess.CompletedProcess:
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **environ}
    return subprocess.run(["bash", "-c", "\n".join(lines)], capture_output=True, text=True, env=env)


def read_job_script(path: str, environ: dict | None = None) -> tuple[list[str], dict[str, int]]:
    """-> (the trainer flags of the `args=(...)` array as bash expands them with the script's own
    defaults, {'nodes': N, 'gpus_per_node': G} from its #SBATCH lines).

    The array may sit in the script or in a file it sources (`source "$(dirname "$0")/x.sh"`, or a
    path under $ROOT). Only variable assignments (no command substitution) and the array are run, by
    bash, in an empty environment plus `environ` (e.g. {"PRESET": "1b"} to see an override). Raises
    LayoutError naming the script when there is no such array or no #SBATCH --nodes.
    """
    if not os.path.isfile(path):
        raise LayoutError(f"--job-script {path}: no such file")
    with open(path) as fh:
        text = fh.read()
    script_dir = os.path.dirname(os.path.abspath(path))
    root = os.path.dirname(script_dir)
    prelude = [f"ROOT={_quote(root)}", "SLURM_JOB_ID=0", "SLURM_NNODES=1", f"SLURM_SUBMIT_DIR={_quote(root)}",
               "set +u"]
    texts = [text]
    for token in _SOURCE.findall(text):  # one level of sourced files, resolved by bash from the prelude
        token = _SCRIPT_DIR.sub(lambda _: script_dir, token)
        resolved = _bash(prelude + _kept_lines(text, root) + [f"printf %s {token}"], environ or {}).stdout
        if resolved and not os.path.isabs(resolved):
            resolved = os.path.join(root, resolved)
        if resolved and os.path.isfile(resolved):
            with open(resolved) as fh:
                texts.append(fh.read())
    block = next((m for m in (_ARGS.search(t) for t in texts) if m), None)
    if not block:
        raise LayoutError(f"--job-script {path}: no `args=(` ... `)` array of trainer flags found "
                          "(in it or in a file it sources)")
    body = [line for t in texts for line in _kept_lines(t[:block.start()] if block.string is t else t, root)]
    after = _additions(block.string[block.end():])
    result = _bash(prelude + body + [block.group(0).strip()] + after + ['printf "%s\\0" "${args[@]}"'],
                   environ or {})
    if result.returncode:
        raise LayoutError(f"--job-script {path}: bash could not expand its args array: {result.stderr.strip()}")
    flags = [a for a in result.stdout.split("\0") if a != ""]
    sbatch = dict(re.findall(r"^#SBATCH\s+--([a-z-]+)[= ](\S+)", text, re.M))
    try:
        alloc = {"nodes": int(sbatch["nodes"]),
                 "gpus_per_node": int(sbatch.get("gpus-per-node") or sbatch["ntasks-per-node"])}
    except (KeyError, ValueError):
        raise LayoutError(f"--job-script {path}: needs #SBATCH --nodes=N and --gpus-per-node=G (or "
                          "--ntasks-per-node) lines with integers") from None
    # Relative paths in the script are relative to its ROOT (the repository).
    for i, flag in enumerate(flags[:-1]):
        if flag == "--deepspeed-config" and not os.path.isabs(flags[i + 1]):
            flags[i + 1] = os.path.join(root, flags[i + 1])
    return flags, alloc


def _quote(s: str) -> str:
    return "'" + s.replace("'", "'\\''") + "'"
