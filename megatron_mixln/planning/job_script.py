"""Read a Slurm job script's training flags and allocation (#SBATCH --nodes / --gpus-per-node), so the
planner checks the script as it is instead of a copy of its values."""
from __future__ import annotations

import os
import re
import subprocess

from megatron_mixln.planning.layout import LayoutError

_ASSIGN = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)=(.*)$")
_ARGS = re.compile(r"^args=\((.*?)^\)", re.S | re.M)


def read_job_script(path: str, environ: dict | None = None) -> tuple[list[str], dict[str, int]]:
    """-> (the trainer flags of the script's `args=(...)` array as bash expands them with the script's
    own defaults, {'nodes': N, 'gpus_per_node': G} from its #SBATCH lines).

    Only the script's plain variable assignments (no command substitution) and the array are run, by
    bash, in an empty environment plus `environ`. Raises LayoutError naming the script when it has no
    `args=(` array or no #SBATCH --nodes.
    """
    if not os.path.isfile(path):
        raise LayoutError(f"--job-script {path}: no such file")
    with open(path) as fh:
        text = fh.read()
    block = _ARGS.search(text)
    if not block:
        raise LayoutError(f"--job-script {path}: no `args=(` ... `)` array of trainer flags found")
    root = os.path.dirname(os.path.dirname(os.path.abspath(path)))
    lines = [f"ROOT={_quote(root)}", "SLURM_JOB_ID=0", "SLURM_SUBMIT_DIR=$ROOT"]
    for line in text[:block.start()].splitlines():
        m = _ASSIGN.match(line.strip())
        if m and "$(" not in m.group(2) and "`" not in m.group(2):
            lines.append(line.strip())
    lines.append(block.group(0))
    lines.append('printf "%s\\0" "${args[@]}"')
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **(environ or {})}
    result = subprocess.run(["bash", "-c", "\n".join(lines)], capture_output=True, text=True, env=env)
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
