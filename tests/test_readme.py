"""README.md and docs/*.md are a program: every ```bash and ```python block runs, in order, in a fresh directory.

The documents are README.md first, then every docs/*.md page in sorted order. A document's runnable
blocks are joined into one bash script, as a user would type them into one terminal from the
repository root: bash blocks verbatim, Python blocks as `python - <<'EOF'` (cwd = the same directory).
The README's runs first, in a directory that is new and empty except for symlinks to the repository's
tracked top-level entries (tools/, megatron_mixln/, ds_configs/, ...) and `.venv`, which points at the
environment running the tests. Then each page's runs in its own copy of the directory the README left
(hard links to its files, the README's exported environment restored), `PAGE_WORKERS` pages at a time:
every file a command reads must be made by an earlier command of its document or by the README, never
by another page. A failure names the block (file and line) and shows its output.
`MIXLN_DOCS_PAGE=<page>` (e.g. `checkpoints`) runs the README and that one page, for quick edits.

Convention (shared by everyone who edits README.md or docs/): a block that cannot run on a CPU in
seconds to a minute (needs a GPU, a cluster, a download, a 7B model) is preceded by the line

    <!-- readme-test: skip: <reason> -->

The reason is required; the skipped blocks are listed when the test runs (`pytest -s` or -rA). A
fence with no language is an error (tag it `bash`, `python`, or e.g. `text` for output); blocks in
other languages (`text`, `yaml`, `json`, ...) are not run. Every relative link and `#anchor` between
the documents must resolve (GitHub's heading anchors).

Substitution table (applied to the text of the blocks that run, in every document; each entry must
still match something, so the table cannot silently go stale):

| document text                | run as                    | why                                                     |
|------------------------------|---------------------------|---------------------------------------------------------|
| `bash launchers/setup_env.sh`| `# setup_env.sh ...`      | the test already runs inside the suite's environment (tests/run.sh / CI ran setup_env.sh); it must not reinstall it |
| `--target-mb 8`              | `--target-mb 2`           | a 2 MB sample corpus: every later step runs on it unchanged, 4x faster |
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
RUN_LANGUAGES = {"bash": "bash", "sh": "bash", "shell": "bash", "python": "python", "py": "python"}
SKIP_MARK = re.compile(r"^<!--\s*readme-test:\s*skip\s*:(.*?)-->\s*$")
FENCE = re.compile(r"^(\s*)(```+|~~~+)\s*([\w+-]*)\s*$")
SUBSTITUTIONS = [  # (pattern, replacement, why)
    (r"^bash launchers/setup_env\.sh\b.*$",
     "# setup_env.sh not run: the test runs inside the environment of the suite, which it must not reinstall",
     "environment"),
    (r"--target-mb 8\b", "--target-mb 2", "a 2 MB sample corpus"),
]
TIMEOUT_S = 900
MARK = "@@README-BLOCK"
PAGE_ENV = "MIXLN_DOCS_PAGE"
PAGE_WORKERS = 2  # pages side by side: most blocks are one single-threaded process, CI has 2 cores
README_ENV = ".readme-env.sh"  # the README's exported variables (e.g. `source .venv/bin/activate`), for the pages


def documents() -> list[Path]:
    """README.md first, then every docs/*.md page in sorted order."""
    return [README, *sorted(DOCS.glob("*.md"))]


def rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


@dataclass
class Block:
    line: int  # 1-based line of the opening fence
    language: str
    text: str
    skip: str | None = None  # the reason, when the block is marked
    path: str = "README.md"  # the document, relative to the repository root

    @property
    def where(self) -> str:
        return f"{self.path}:{self.line}"


def parse_blocks(text: str, path: str = "README.md") -> list[Block]:
    """Fenced blocks in order, with the skip reason of a marker on the nearest non-blank line above.
    Raises ValueError (naming `path:line`) for a marker without a reason, a marker not followed by a
    fence, a fence with no language, or an unclosed fence."""
    lines = text.splitlines()
    blocks, pending, i = [], None, 0
    while i < len(lines):
        line = lines[i]
        mark = SKIP_MARK.match(line.strip())
        if mark:
            if not mark[1].strip():
                raise ValueError(f"{path}:{i + 1}: readme-test skip marker without a reason")
            pending = (i + 1, mark[1].strip())
            i += 1
            continue
        fence = FENCE.match(line)
        if fence:
            indent, ticks, language = fence.groups()
            if not language:
                raise ValueError(f"{path}:{i + 1}: fenced block without a language; tag it (bash, python, text, ...)")
            end = next((j for j in range(i + 1, len(lines))
                        if lines[j].strip().startswith(ticks) and not lines[j].strip()[len(ticks):].strip()), None)
            if end is None:
                raise ValueError(f"{path}:{i + 1}: unclosed fenced block")
            body = "\n".join(ln[len(indent):] if ln.startswith(indent) else ln for ln in lines[i + 1:end])
            blocks.append(Block(i + 1, language.lower(), body, pending[1] if pending else None, path))
            pending, i = None, end + 1
            continue
        if pending and line.strip():
            raise ValueError(f"{path}:{pending[0]}: readme-test skip marker not directly above a fenced block")
        i += 1
    if pending:
        raise ValueError(f"{path}:{pending[0]}: readme-test skip marker not directly above a fenced block")
    return blocks


def all_blocks(paths: list[Path] | None = None) -> list[Block]:
    """The blocks of every document, README first."""
    return [b for p in (paths or documents()) for b in parse_blocks(p.read_text(encoding="utf-8"), rel(p))]


def substitute(blocks: list[Block]) -> list[Block]:
    """The runnable blocks with the substitution table applied; raises ValueError for an entry that
    matches nothing in any document (the documents changed: update the table)."""
    run = [b for b in blocks if b.skip is None and b.language in RUN_LANGUAGES]
    used = set()
    out = []
    for b in run:
        text = b.text
        for k, (pattern, replacement, _) in enumerate(SUBSTITUTIONS):
            text, n = re.subn(pattern, replacement, text, flags=re.M)
            used |= {k} if n else set()
        out.append(Block(b.line, b.language, text, None, b.path))
    stale = [SUBSTITUTIONS[k][0] for k in range(len(SUBSTITUTIONS)) if k not in used]
    if stale:
        raise ValueError(f"substitutions that match no runnable block of README.md or docs/ "
                         f"(update tests/test_readme.py): {stale}")
    return out


def select_page(blocks: list[Block], page: str | None) -> list[Block]:
    """All blocks, or (page given) the README's and those of docs/<page>.md; ValueError for an unknown page."""
    if not page:
        return blocks
    path = f"docs/{page.removesuffix('.md')}.md"
    if not (ROOT / path).is_file():
        raise ValueError(f"{PAGE_ENV}={page}: no {path}; pages: {', '.join(p.stem for p in documents()[1:])}")
    return [b for b in blocks if b.path in ("README.md", path)]


def by_document(blocks: list[Block]) -> list[tuple[str, list[Block]]]:
    """[(document, its blocks)] in document order (README.md first); documents without blocks are left out."""
    groups: dict[str, list[Block]] = {}
    for b in blocks:
        groups.setdefault(b.path, []).append(b)
    return list(groups.items())


def build_script(blocks: list[Block], prologue: str = "", epilogue: str = "") -> str:
    """One bash script running `blocks` in order, each announced by a MARK line (index, file:line, seconds);
    `prologue`/`epilogue`: bash run before the first block / after the last one."""
    parts = ["set -eo pipefail", prologue]
    for n, b in enumerate(blocks):
        parts.append(f'echo "{MARK} {n} {b.where} $SECONDS"')
        if RUN_LANGUAGES[b.language] == "bash":
            parts.append(b.text)
        else:
            eof = "__README_PYTHON__"
            assert eof not in b.text
            parts.append(f"python - <<'{eof}'\n{b.text}\n{eof}")
    parts.append(epilogue)
    parts.append(f'echo "{MARK} end end:0 $SECONDS"')
    return "\n".join(parts) + "\n"


# the README's environment, saved at its end and restored before each page (not the shell's own variables)
SAVE_ENV = (f"declare -px | grep -Ev '^declare -[a-z]*r|^declare -[^ ]* (PWD|OLDPWD|SHLVL|_|BASH_[A-Z_]*)(=|$)' "
            f"> {README_ENV}")
LOAD_ENV = f"source {README_ENV}"


def copy_state(src: Path, dst: Path) -> None:
    """dst: the directory the README left in src, as hard links (no bytes copied; a page writes new files)."""
    subprocess.run(["cp", "-al", str(src), str(dst)], check=True)


# --- links and anchors --------------------------------------------------------------------------

LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(([^()\s]+)(?:\s+\"[^\"]*\")?\)")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")


def _prose_lines(text: str):
    """(line number, line) outside fenced blocks, with inline code spans blanked."""
    fence = None
    for i, line in enumerate(text.splitlines(), 1):
        m = FENCE.match(line)
        if m or (fence and line.strip().startswith(fence)):
            ticks = m.group(2) if m else fence
            fence = None if fence else ticks
            continue
        if fence is None:
            yield i, re.sub(r"`[^`]*`", lambda s: " " * len(s.group()), line)


def github_anchor(heading: str) -> str:
    """GitHub's anchor of a heading's text: markup dropped, lower case, every character but letters,
    digits, `_`, `-` and spaces removed, spaces turned into `-`."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # links keep their text
    text = re.sub(r"<[^>]+>", "", text).replace("`", "").replace("*", "")
    return re.sub(r"[^\w\- ]", "", text.lower()).replace(" ", "-")


def anchors(text: str) -> set[str]:
    """The anchors of a document's headings, duplicates numbered -1, -2 ... as GitHub numbers them."""
    seen: dict[str, int] = {}
    out = set()
    fence = None
    for line in text.splitlines():
        m = FENCE.match(line)
        if m or (fence and line.strip().startswith(fence)):
            fence = None if fence else (m.group(2) if m else fence)
            continue
        h = HEADING.match(line) if fence is None else None
        if h:
            slug = github_anchor(h.group(2))
            n = seen.get(slug, 0)
            out.add(slug if n == 0 else f"{slug}-{n}")
            seen[slug] = n + 1
    return out


def broken_links(paths: list[Path]) -> list[str]:
    """`file:line: target (why)` for every relative link or #anchor that does not resolve."""
    problems = []
    cache: dict[Path, set[str]] = {}
    for path in paths:
        text = path.read_text(encoding="utf-8")
        for line_no, line in _prose_lines(text):
            for m in LINK.finditer(line):
                target = m.group(1)
                if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
                    continue
                file_part, _, anchor = target.partition("#")
                dest = (path.parent / file_part).resolve() if file_part else path
                where = f"{rel(path)}:{line_no}: {target}"
                if ROOT not in dest.parents and dest != ROOT:
                    problems.append(f"{where} (points outside the repository)")
                elif not dest.exists():
                    problems.append(f"{where} (no such file)")
                elif anchor:
                    if dest.suffix != ".md":
                        problems.append(f"{where} (an anchor into a file that is not markdown)")
                        continue
                    if dest not in cache:
                        cache[dest] = anchors(dest.read_text(encoding="utf-8"))
                    if anchor not in cache[dest]:
                        problems.append(f"{where} (no heading with anchor #{anchor} in {rel(dest)})")
    return problems


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


# --- the parser, the table and the link check, on made-up documents --------------------------------

def test_parser_markers_and_substitutions():
    text = "\n".join([
        "# t", "```bash", "echo one --target-mb 8", "```",
        "<!-- readme-test: skip: needs a GPU -->", "", "```python", "import nothing_here", "```",
        "```text", "output", "```", "  ```python", "  print(1)", "  ```",
    ])
    blocks = parse_blocks(text, "docs/x.md")
    assert [(b.where, b.language, b.skip) for b in blocks] == [
        ("docs/x.md:2", "bash", None), ("docs/x.md:7", "python", "needs a GPU"),
        ("docs/x.md:10", "text", None), ("docs/x.md:13", "python", None)]
    assert blocks[3].text == "print(1)"
    with pytest.raises(ValueError, match="match no runnable block"):
        substitute(blocks)  # setup_env.sh is not in it
    with_setup = blocks + parse_blocks("```bash\nbash launchers/setup_env.sh\n```", "README.md")
    assert [b.where for b in substitute(with_setup)] == ["docs/x.md:2", "docs/x.md:13", "README.md:1"]
    for bad, message in (("<!-- readme-test: skip: -->\n```bash\nx\n```", "docs/y.md:1: .*without a reason"),
                         ("<!-- readme-test: skip: why -->\ntext\n```bash\nx\n```", "docs/y.md:1: .*not directly above"),
                         ("a\n```\nx\n```", "docs/y.md:2: .*without a language"), ("```bash\nx", "docs/y.md:1: unclosed")):
        with pytest.raises(ValueError, match=message):
            parse_blocks(bad, "docs/y.md")


def test_script_stops_at_the_first_failing_block(tmp_path):
    blocks = [Block(1, "bash", "echo first"), Block(5, "python", "import sys\nsys.exit(3)", path="docs/a.md"),
              Block(9, "bash", "echo never")]
    (tmp_path / "s.sh").write_text(build_script(blocks))
    proc = subprocess.run(["bash", str(tmp_path / "s.sh")], cwd=tmp_path, capture_output=True, text=True,
                          env=dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"]))
    assert proc.returncode == 3 and "first" in proc.stdout and "never" not in proc.stdout
    assert proc.stdout.strip().splitlines()[-1].startswith(f"{MARK} 1 docs/a.md:5 ")


def test_pages_see_the_readme_state_and_not_each_other(tmp_path):
    """What the README exported and wrote reaches every page's copy; a file one page writes does not reach another."""
    readme_dir = tmp_path / "readme"
    readme_dir.mkdir()
    readme = _run_script([Block(1, "bash", "export FROM_README=yes\necho made > made.txt")], readme_dir,
                         tmp_path / "r.sh", epilogue=SAVE_ENV)
    assert _failure(readme) is None, readme["output"]
    outcomes = []
    for name, text in (("a", 'test "$FROM_README" = yes && cat made.txt && echo mine > a.txt'), ("b", "cat a.txt")):
        copy_state(readme_dir, tmp_path / name)
        outcomes.append(_run_script([Block(3, "bash", text, path=f"docs/{name}.md")], tmp_path / name,
                                    tmp_path / f"{name}.sh", prologue=LOAD_ENV))
    assert _failure(outcomes[0]) is None and "made" in outcomes[0]["output"], outcomes[0]["output"]
    assert _failure(outcomes[1]).startswith("docs/b.md:3: the bash block exits 1"), outcomes[1]["output"]


def test_github_anchors():
    # expected values: the anchors github.com gives these headings
    assert github_anchor("Data: corpus → tokenizer → Megatron indexed dataset → GPT samples") == \
        "data-corpus--tokenizer--megatron-indexed-dataset--gpt-samples"
    assert github_anchor("Memory planner (`tools/estimate_memory.py`)") == "memory-planner-toolsestimate_memorypy"
    assert github_anchor("Real C4 and the paper's T5 tokenizer") == "real-c4-and-the-papers-t5-tokenizer"
    assert github_anchor("See [the page](x.md) **now**") == "see-the-page-now"
    assert anchors("# A\n## A\n```bash\n# A\n```\n### A") == {"a", "a-1", "a-2"}


def test_link_check_finds_broken_links(tmp_path, monkeypatch):
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    (tmp_path / "docs").mkdir()
    (tmp_path / "README.md").write_text(
        "# Top\n## Part one\n[ok](docs/a.md#section-b) [ok](#part-one) [ok](https://x.org/#nothing)\n"
        "[bad](docs/a.md#nothing) [bad](docs/missing.md) `[code](docs/missing.md)`\n"
        "```text\n[in a fence](nothing.md)\n```\n")
    (tmp_path / "docs" / "a.md").write_text("# A\n## Section B\n[ok](../README.md#top) [bad](#part-one)\n")
    problems = broken_links([tmp_path / "README.md", tmp_path / "docs" / "a.md"])
    assert problems == ["README.md:4: docs/a.md#nothing (no heading with anchor #nothing in docs/a.md)",
                        "README.md:4: docs/missing.md (no such file)",
                        "docs/a.md:3: #part-one (no heading with anchor #part-one in docs/a.md)"]


# --- the README and docs/ themselves -----------------------------------------------------------

def test_every_docs_page_is_covered():
    """A new page under docs/ cannot escape the test: every markdown file there is a parsed document."""
    on_disk = {rel(p) for p in DOCS.rglob("*.md")}
    parsed = {rel(p) for p in documents()}
    assert on_disk <= parsed, f"docs pages the README test does not run: {sorted(on_disk - parsed)}"
    assert rel(documents()[0]) == "README.md" and len(parsed) > 1


def test_links_and_anchors_resolve():
    problems = broken_links(documents())
    assert not problems, "broken relative links or anchors:\n" + "\n".join(problems)


def test_readme_blocks_parse_and_skips_have_reasons():
    blocks = all_blocks()
    skipped = [b for b in blocks if b.skip]
    print("\nblocks skipped by the README test:")
    for b in skipped:
        print(f"  {b.where} ({b.language}): {b.skip}")
    runnable = substitute(blocks)
    assert len([b for b in runnable if b.path == "README.md"]) >= 3  # the first run by hand is actually run
    assert len(runnable) >= 18


def _run_script(blocks: list[Block], work: Path, script: Path, prologue: str = "", epilogue: str = "") -> dict:
    """Runs `blocks` as one bash script in `work`; -> returncode, output, marks [(pos, index, where, seconds)]."""
    script.write_text(build_script(blocks, prologue, epilogue))
    start = time.monotonic()
    proc = subprocess.run(["bash", str(script)], cwd=work, env=_env(work), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=TIMEOUT_S, stdin=subprocess.DEVNULL)
    marks = [(m.start(), m.group(1), m.group(2), int(m.group(3)))
             for m in re.finditer(rf"^{MARK} (\S+) (\S+) (\d+)$", proc.stdout, flags=re.M)]
    return {"returncode": proc.returncode, "output": proc.stdout, "marks": marks, "blocks": blocks,
            "seconds": time.monotonic() - start}


def _failure(run: dict) -> str | None:
    """None when the script ran to its end, else the failing block (file:line), as run, and its output's tail."""
    marks, output = run["marks"], run["output"]
    if run["returncode"] == 0 and marks and marks[-1][1] == "end":
        return None
    if not marks:
        return f"the script exits {run['returncode']} before its first block\n{output[-4000:]}"
    pos, n, where, _ = marks[-1]
    if n == "end":  # the epilogue (saving the README's environment) failed
        return f"{where}: after the last block, exit {run['returncode']}\n{output[pos:][-4000:]}"
    block = run["blocks"][int(n)]
    return (f"{where}: the {block.language} block exits {run['returncode']}\n"
            f"--- block (as run) ---\n{block.text}\n--- its output (tail) ---\n{output[pos:][-4000:]}")


def _timings(run: dict) -> str:
    return ", ".join(f"{a[2]} {b[3] - a[3]} s" for a, b in zip(run["marks"], run["marks"][1:]))


@pytest.mark.slow
def test_every_readme_command_runs_in_a_fresh_directory(tmp_path):
    documents_ = by_document(select_page(substitute(all_blocks()), os.environ.get(PAGE_ENV)))
    assert documents_[0][0] == "README.md"
    work = tmp_path / "readme"
    work.mkdir()
    fresh_checkout(work)
    start = time.monotonic()
    readme = _run_script(documents_[0][1], work, tmp_path / "readme.sh", epilogue=SAVE_ENV)
    print(f"\nREADME test: README.md, {len(documents_[0][1])} blocks in {readme['seconds']:.0f} s: {_timings(readme)}")
    problem = _failure(readme)
    if problem:
        raise AssertionError(problem)

    def run_page(path_blocks):
        path, blocks = path_blocks
        page = tmp_path / Path(path).stem
        copy_state(work, page)
        return _run_script(blocks, page, tmp_path / f"{Path(path).stem}.sh", prologue=LOAD_ENV)

    with ThreadPoolExecutor(PAGE_WORKERS) as pool:
        pages = list(pool.map(run_page, documents_[1:]))
    for (path, blocks), run in zip(documents_[1:], pages):
        print(f"  {path}, {len(blocks)} blocks in {run['seconds']:.0f} s: {_timings(run)}")
    print(f"README test: {sum(len(b) for _, b in documents_)} blocks in {time.monotonic() - start:.0f} s")
    problems = [p for p in map(_failure, pages) if p]
    assert not problems, "\n\n".join(problems)
    # sizes in the snippets stay sane: no sample count that needs > 100 epochs of the data it reads
    for run in [readme, *pages]:
        assert "(more than 100); its sample index" not in run["output"], run["output"]
