"""`--help` reads as written: a parser whose description is a module docstring keeps its line breaks (the
usage examples in it stay one command per line), and every flag states its default once."""
import argparse
import ast
import re
from pathlib import Path

from megatron_mixln.cli import add_dataclass_args

ROOT = Path(__file__).resolve().parents[2]
RAW = ("RawDescriptionHelpFormatter", "RawTextHelpFormatter")


def _parser_calls():
    for path in sorted(p for d in ("megatron_mixln", "tools", "bench") for p in (ROOT / d).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", None)) == "ArgumentParser":
                yield path.relative_to(ROOT), node


def test_docstring_descriptions_keep_their_line_breaks():
    bad, docstring_parsers = [], 0
    for path, call in _parser_calls():
        kw = {k.arg: k.value for k in call.keywords}
        if "__doc__" not in ast.unparse(kw.get("description", ast.Constant(None))):
            continue
        docstring_parsers += 1
        formatter = ast.unparse(kw.get("formatter_class", ast.Constant(None)))
        if ast.unparse(kw["description"]) != "__doc__" or not formatter.endswith(RAW):
            bad.append(f"{path}:{call.lineno}")
    assert docstring_parsers >= 10
    assert not bad, f"description=__doc__ needs the whole docstring and a Raw*HelpFormatter: {bad}"


def test_plot_metrics_help_shows_its_example_on_one_line():
    import importlib.util
    import contextlib
    import io

    spec = importlib.util.spec_from_file_location("plot_metrics", ROOT / "tools" / "plot_metrics.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):
        module.main(["--help"])
    example = next(ln for ln in module.__doc__.splitlines() if ln.strip().startswith("python tools/plot_metrics.py"))
    assert example in out.getvalue().splitlines()


def test_every_dataclass_flag_states_its_default_once():
    from megatron_mixln.model import ModelConfig
    from megatron_mixln.training.arguments import build_parser
    from megatron_mixln.training.config import TrainingConfig

    parser = argparse.ArgumentParser()
    add_dataclass_args(parser, ModelConfig)
    add_dataclass_args(parser, TrainingConfig)
    for p in (parser, build_parser()):
        for action in p._actions:
            if action.help and action.help != argparse.SUPPRESS:
                assert len(re.findall(r"default", action.help, flags=re.I)) <= 1, action.help
    helps = {a.dest: a.help for a in parser._actions}
    assert helps["num_query_groups"].endswith("(default: = heads)")  # its own wording, not "(default: None)" too
    assert helps["hidden_size"].endswith("(default: 512)")
