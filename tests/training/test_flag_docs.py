"""docs/flags.md is generated from the config dataclasses and must be current; it lists every flag the
trainer's parser accepts (the parser is the independent reference), each once, with its default."""
from __future__ import annotations

import dataclasses
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

from megatron_mixln.model import ModelConfig
from megatron_mixln.training.arguments import build_parser
from megatron_mixln.training.config import TrainingConfig
from megatron_mixln.training.flag_docs import REGENERATE, render, sections

ROOT = Path(__file__).resolve().parents[2]
PAGE = ROOT / "docs" / "flags.md"
TOOL = ROOT / "tools" / "gen_flag_docs.py"


def test_flags_page_is_current():
    assert PAGE.read_text(encoding="utf-8") == render() + "\n", (
        f"docs/flags.md is stale: the config dataclasses changed; regenerate it with `{REGENERATE}`")


def test_every_parser_flag_is_on_the_page_once_with_its_default():
    page = render()
    rows = re.findall(r"^\| `(--[\w-]+)`(?: / `--no-[\w-]+`)? \| (\w+) \| ([^|]+) \|", page, flags=re.M)
    listed = [flag for flag, _, _ in rows]
    assert len(listed) == len(set(listed)), "a flag listed twice"
    visible = {opt for a in build_parser()._actions if a.help != "==SUPPRESS==" for opt in a.option_strings
               if opt.startswith("--") and not opt.startswith("--no-") and opt != "--help"}
    assert visible == set(listed)
    defaults = {flag: default.strip() for flag, _, default in rows}
    for cls in (ModelConfig, TrainingConfig):
        for f in dataclasses.fields(cls):
            if not f.init:
                continue
            flag = "--" + f.name.replace("_", "-")
            want = ("—" if f.default in (None, dataclasses.MISSING) else
                    ("on" if f.default else "off") if isinstance(f.default, bool) else f"`{f.default}`")
            # a default that depends on another flag (--learnable-embedding-scale) is spelled out instead
            assert defaults[flag] == f.metadata.get("flag_default", want), flag


def test_sections_follow_the_source_comments():
    titles = [t for t, _ in sections(TrainingConfig)]
    assert titles[:3] == ["data", "batch", "optimizer and schedule"]
    names = [f.name for _, fs in sections(TrainingConfig) for f in fs]
    assert names == [f.name for f in dataclasses.fields(TrainingConfig) if f.init]


def test_check_mode_fails_on_a_stale_page_and_names_the_command(tmp_path, capsys):
    stale = tmp_path / "flags.md"
    stale.write_text(render().replace("model width", "model breadth") + "\n")
    proc = subprocess.run([sys.executable, str(TOOL), "--check", "--output", str(stale)], capture_output=True,
                          text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert proc.returncode == 1 and REGENERATE in proc.stderr and proc.stdout == ""
    spec = importlib.util.spec_from_file_location("gen_flag_docs", TOOL)
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    assert tool.main(["--output", str(stale)]) == 0 and stale.read_text() == render() + "\n"
    assert tool.main(["--check", "--output", str(stale)]) == 0
