"""Every entry point refuses abbreviated flags (Megatron-LM's allow_abbrev=False): a typo such as
`--train-iter 5` next to `--train-iters 2` is an error, not a silent override.

Two independent checks: every `argparse.ArgumentParser(...)` in the package, tools/ and bench/ passes
allow_abbrev=False (found by parsing the source, so a new tool is covered without listing it), and
every script with a `__main__` block, run as a user would, rejects `--hel` (which argparse would
otherwise expand to --help and exit 0; the same process as test_one_line_errors' unknown flag,
tests/tools/entry_points_testlib.py).
"""
import ast

import pytest

from entry_points_testlib import BAD_FLAGS, ROOT, entry_points, python_files


def _parser_calls(path):
    tree = ast.parse(path.read_text(), str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", None)
            if name == "ArgumentParser":
                yield node


ENTRY_POINTS = entry_points()


def test_every_argument_parser_refuses_abbreviations():
    found, missing = [], []
    for path in python_files():
        for call in _parser_calls(path):
            found.append(f"{path.relative_to(ROOT)}:{call.lineno}")
            kw = {k.arg: k.value for k in call.keywords}
            if not (isinstance(kw.get("allow_abbrev"), ast.Constant) and kw["allow_abbrev"].value is False):
                missing.append(found[-1])
    assert len(found) >= 10, found  # pretrain's parser, 7 tools, 2 benchmarks
    assert not missing, f"ArgumentParser without allow_abbrev=False: {missing}"


def test_entry_points_are_found():
    names = {p.relative_to(ROOT).as_posix() for p in ENTRY_POINTS}
    assert {"megatron_mixln/pretrain.py", "tools/preprocess_c4.py", "tools/convert_checkpoint.py",
            "bench/preprocess.py"} <= names, names


def test_every_entry_point_rejects_an_abbreviated_flag(entry_point_runs):
    """`--hel` among BAD_FLAGS (entry_points_testlib): expanded to --help it would print the usage and exit 0."""
    assert "--hel" in BAD_FLAGS
    for path in ENTRY_POINTS:
        code, out, err = entry_point_runs[(path, "flag")]
        assert code == 2, (path, code, out[-300:], err[-300:])
        assert "error:" in err and "usage:" not in out, (path, err[-300:])


@pytest.mark.parametrize("argv, unknown", [
    (["--train-iters", "2", "--train-iter", "5"], "--train-iter 5"),  # the typo of the issue
    (["--micro-batch", "2"], "--micro-batch 2"),
])
def test_pretrain_names_the_unknown_abbreviation(capsys, argv, unknown):
    from megatron_mixln.training.arguments import build_parser

    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args(argv)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and f"error: unrecognized arguments: {unknown}" in err
    assert len(err.strip().splitlines()) == 1, err  # one line, not the usage block
    assert build_parser().parse_args(["--train-iters", "2"]).train_iters == 2  # the full name still works


def test_pretrain_suggests_the_flag_a_typo_meant(capsys):
    from megatron_mixln.training.arguments import build_parser

    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args(["--norm-postion", "mix"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "did you mean --norm-position?" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("argv, expected", [
    (["--norm-position", "sianese"], "--norm-position: unknown value 'sianese'"),
    (["--norm-position", "post*3"], "--norm-position: the explicit list has 3 entries but --num-layers=2"),
])
def test_model_config_errors_name_the_flags(argv, expected):
    from megatron_mixln.training.arguments import parse_configs
    from megatron_mixln.training.config import UsageError

    with pytest.raises(UsageError) as err:
        parse_configs(["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4", *argv])
    assert str(err.value).startswith(expected), str(err.value)
