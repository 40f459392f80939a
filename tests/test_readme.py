"""README.md is a program: every ```bash and ```python block runs, in order, in a fresh directory.

The blocks are joined into one bash script, as a user would type them into one terminal from the
repository root: bash blocks verbatim, Python blocks as `python - <<'EOF'` (cwd = the same
directory). The directory is new and empty except for symlinks to the repository's tracked
top-level entries (tools/, megatron_mixln/, ds_configs/, ...) and `.venv`, which points at the
environment running the tests; so every file a command reads must be made by an earlier command.
A failure names the block (README.md line) and shows its output.

Convention (shared by everyone who edits README.md): a block that cannot run on a CPU in seconds to a
minute (needs a GPU, a cluster, a download, a 7B model) is preceded by the line

    <!-- readme-test: skip: <reason> -->

The reason is required; the skipped blocks are listed when the test runs (`pytest -s` or -rA). A
fence with no language is an error (tag it `bash`, `python`, or e.g. `text` for output); blocks in
other languages (`text`, `yaml`, `json`, ...) are not run.

Substitution table (applied to the text of the blocks that run; each entry must still match
something, so the table cannot silently go stale):

| README text                  | run as                    | why                                                     |
|------------------------------|---------------------------|---------------------------------------------------------|
| `bash launchers/setup_env.sh`| `# setup_env.sh ...`      | the test already runs inside the suite's environment (tests/run.sh / CI ran setup_env.sh); it must not reinstall it |
| `--target-mb 20`             | `--target-mb 2`           | a 2 MB sample corpus: every later step runs on it unchanged, 10x faster |
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
RUN_LANGUAGES = {"bash": "bash", "sh": "bash", "shell": "bash", "python": "python", "py": "python"}
SKIP_MARK = re.compile(r"^<!--\s*readme-test:\s*skip\s*:(.*?)-->\s*$")
FENCE = re.compile(r"^(\s*)(```+|~~~+)\s*([\w+-]*)\s*$")
SUBSTITUTIONS = [  # (pattern, replacement, why)
    (r"^bash launchers/setup_env\.sh\b.*$",
     "# setup_env.sh not run: the test runs inside the environment of the suite, which it must not reinstall",
     "environment"),
    (r"--target-mb 20\b", "--target-mb 2", "a 2 MB sample corpus"),
]
TIMEOUT_S = 900
MARK = "@@README-BLOCK"


@dataclass
class Block:
    line: int  # 1-based line of the opening fence
    language: str
    text: str
    skip: str | None = None  # the reason, when the block is marked


def parse_blocks(text: str) -> list[Block]:
    """Fenced blocks in order, with the skip reason of a marker on the nearest non-blank line above.
    Raises ValueError for a marker without a reason, a marker not followed by a fence, a fence with
    no language, or an unclosed fence."""
    lines = text.splitlines()
    blocks, pending, i = [], None, 0
    while i < len(lines):
        line = lines[i]
        mark = SKIP_MARK.match(line.strip())
        if mark:
            if not mark[1].strip():
                raise ValueError(f"README.md:{i + 1}: readme-test skip marker without a reason")
            pending = (i + 1, mark[1].strip())
            i += 1
            continue
        fence = FENCE.match(line)
        if fence:
            indent, ticks, language = fence.groups()
            if not language:
                raise ValueError(f"README.md:{i + 1}: fenced block without a language; tag it (bash, python, text, ...)")
            end = next((j for j in range(i + 1, len(lines))
                        if lines[j].strip().startswith(ticks) and not lines[j].strip()[len(ticks):].strip()), None)
            if end is None:
                raise ValueError(f"README.md:{i + 1}: unclosed fenced block")
            body = "\n".join(ln[len(indent):] if ln.startswith(indent) else ln for ln in lines[i + 1:end])
            blocks.append(Block(i + 1, language.lower(), body, pending[1] if pending else None))
            pending, i = None, end + 1
            continue
        if pending and line.strip():
            raise ValueError(f"README.md:{pending[0]}: readme-test skip marker not directly above a fenced block")
        i += 1
    if pending:
        raise ValueError(f"README.md:{pending[0]}: readme-test skip marker not directly above a fenced block")
    return blocks


def substitute(blocks: list[Block]) -> list[Block]:
    """The runnable blocks with the substitution table applied; raises ValueError for an entry that
    matches nothing (the README changed: update the table)."""
    run = [b for b in blocks if b.skip is None and b.language in RUN_LANGUAGES]
    used = set()
    out = []
    for b in run:
        text = b.text
        for k, (pattern, replacement, _) in enumerate(SUBSTITUTIONS):
            text, n = re.subn(pattern, replacement, text, flags=re.M)
            used |= {k} if n else set()
        out.append(Block(b.line, b.language, text))
    stale = [SUBSTITUTIONS[k][0] for k in range(len(SUBSTITUTIONS)) if k not in used]
    if stale:
        raise ValueError(f"substitutions that match no runnable README block (update tests/test_readme.py): {stale}")
    return out


def build_script(blocks: list[Block]) -> str:
    parts = ["set -eo pipefail"]
    for n, b in enumerate(blocks):
        parts.append(f'echo "{MARK} {n} README.md:{b.line} $SECONDS"')
        if RUN_LANGUAGES[b.language] == "bash":
            parts.append(b.text)
        else:
            eof = "__README_PYTHON__"
            assert eof not in b.text
            parts.append(f"python - <<'{eof}'\n{b.text}\n{eof}")
    parts.append(f'echo "{MARK} end README.md:0 $SECONDS"')
    return "\n".join(parts) + "\n"


def _environment_dir(work: Path) -> None:
    """work/.venv: the environment running the tests (a symlink when it has bin/activate, else a shim)."""
    prefix = Path(os.environ.get("VENV") or sys.prefix)
    if (prefix / "bin" / "activate").is_file() and (prefix / "bin" / "python").exists():
        (work / ".venv").symlink_to(prefix)
        return
    bin_dir = work / ".venv" / "bin"
    bin_dir.mkdir(parents=True)
    (bin_dir / "python").symlink_to(sys.executable)
    (bin_dir / "activate").write_text(f'export VIRTUAL_ENV="{work / ".venv"}"\nexport PATH="{bin_dir}:$PATH"\n')


def fresh_checkout(work: Path) -> None:
    """Symlinks to the repository's tracked top-level entries (nothing generated comes along)."""
    try:
        tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
        names = {p.split("/")[0] for p in tracked.splitlines()}
    except (OSError, subprocess.CalledProcessError):  # not a git checkout: everything but hidden entries
        names = {p.name for p in ROOT.iterdir() if not p.name.startswith(".")}
    for name in sorted(names - {".venv", ".git"}):
        if (ROOT / name).exists():
            (work / name).symlink_to(ROOT / name)
    _environment_dir(work)


def _env(work: Path) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                        "VIRTUAL_ENV", "PYTEST_CURRENT_TEST")}
    env.update(PATH=os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", ""), PYTHONPATH=str(work),
               OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", WANDB_MODE="offline",
               HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", GLOO_SOCKET_IFNAME="lo", MPLBACKEND="Agg")
    return env


# --- the parser and the table, on a made-up README ---------------------------------------------

def test_parser_markers_and_substitutions():
    text = "\n".join([
        "# t", "```bash", "echo one --target-mb 20", "```",
        "<!-- readme-test: skip: needs a GPU -->", "", "```python", "import nothing_here", "```",
        "```text", "output", "```", "  ```python", "  print(1)", "  ```",
    ])
    blocks = parse_blocks(text)
    assert [(b.line, b.language, b.skip) for b in blocks] == [(2, "bash", None), (7, "python", "needs a GPU"),
                                                             (10, "text", None), (13, "python", None)]
    assert blocks[3].text == "print(1)"
    with pytest.raises(ValueError, match="match no runnable README block"):
        substitute(blocks)  # setup_env.sh is not in it
    for bad, message in (("<!-- readme-test: skip: -->\n```bash\nx\n```", "without a reason"),
                         ("<!-- readme-test: skip: why -->\ntext\n```bash\nx\n```", "not directly above"),
                         ("```\nx\n```", "without a language"), ("```bash\nx", "unclosed")):
        with pytest.raises(ValueError, match=message):
            parse_blocks(bad)


def test_script_stops_at_the_first_failing_block(tmp_path):
    blocks = [Block(1, "bash", "echo first"), Block(5, "python", "import sys\nsys.exit(3)"),
              Block(9, "bash", "echo never")]
    (tmp_path / "s.sh").write_text(build_script(blocks))
    proc = subprocess.run(["bash", str(tmp_path / "s.sh")], cwd=tmp_path, capture_output=True, text=True,
                          env=dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"]))
    assert proc.returncode == 3 and "first" in proc.stdout and "never" not in proc.stdout
    assert proc.stdout.strip().splitlines()[-1].startswith(f"{MARK} 1 README.md:5 ")


# --- the README itself ------------------------------------------------------------------------

def test_readme_blocks_parse_and_skips_have_reasons():
    blocks = parse_blocks(README.read_text())
    skipped = [b for b in blocks if b.skip]
    print("\nREADME blocks skipped by the README test:")
    for b in skipped:
        print(f"  README.md:{b.line} ({b.language}): {b.skip}")
    assert len(substitute(blocks)) >= 9  # the step-by-step path is actually run


@pytest.mark.slow
def test_every_readme_command_runs_in_a_fresh_directory(tmp_path):
    blocks = substitute(parse_blocks(README.read_text()))
    work = tmp_path / "readme"
    work.mkdir()
    fresh_checkout(work)
    script = build_script(blocks)
    (tmp_path / "readme.sh").write_text(script)
    start = time.monotonic()
    proc = subprocess.run(["bash", str(tmp_path / "readme.sh")], cwd=work, env=_env(work), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=TIMEOUT_S, stdin=subprocess.DEVNULL)
    output = proc.stdout
    marks = [(m.start(), m.group(1), m.group(2), int(m.group(3)))
             for m in re.finditer(rf"^{MARK} (\S+) README\.md:(\d+) (\d+)$", output, flags=re.M)]
    timings = [f"README.md:{a[2]} {b[3] - a[3]} s" for a, b in zip(marks, marks[1:])]
    print(f"\nREADME test: {len(blocks)} blocks in {time.monotonic() - start:.0f} s: " + ", ".join(timings))
    if proc.returncode != 0:
        pos, n, line, _ = marks[-1]
        block = blocks[int(n)]
        raise AssertionError(f"README.md:{line}: the {block.language} block exits {proc.returncode}\n"
                             f"--- block (as run) ---\n{block.text}\n--- its output (tail) ---\n{output[pos:][-4000:]}")
    assert marks[-1][1] == "end"
    # sizes in the snippets stay sane: no sample count that needs > 100 epochs of the data it reads
    assert "(more than 100); its sample index" not in output, output
