"""Every entry point fails the same way (megatron_mixln.errors, docs/errors.md): bad input prints ONE line
`<tool>: error: ...` naming the flag or file, and exits 2.

Each script with a `__main__` block under tools/, and `python -m megatron_mixln.pretrain`, is run as a user
would with an unknown flag and with an input file that does not exist (tests/tools/entry_points_testlib.py:
one process per command line, shared with test_no_abbreviations). The scripts are found by parsing
tools/, so a new tool fails this test until it is listed here.
"""
import pytest

from entry_points_testlib import BAD_FLAGS, CASES, ROOT, entry_points, tool_name


def test_every_tool_is_covered():
    assert sorted(set(CASES) - {"pretrain"}) == sorted(tool_name(p) for p in entry_points() if p.parent == ROOT / "tools")
    assert "pretrain" in {tool_name(p) for p in entry_points()}


@pytest.fixture(scope="module")
def results(entry_point_runs):
    """(tool, "flag" | "file") -> (exit code, stderr): its required flags + BAD_FLAGS, its missing input."""
    out = {(tool_name(key), kind): (code, err) for (key, kind), (code, _, err) in entry_point_runs.items()
           if kind == "flag" and tool_name(key) in CASES}
    out.update({key: (code, err) for key, (code, _, err) in entry_point_runs.items() if key[1] == "file"})
    return out


@pytest.mark.parametrize("tool", sorted(CASES))
def test_unknown_flag_is_one_line_and_exit_2(results, tool):
    code, err = results[(tool, "flag")]
    assert code == 2 and err.count("\n") == 1, err
    assert err.startswith(f"{tool}: error: ") and f"unrecognized arguments: {' '.join(BAD_FLAGS)}" in err, err


@pytest.mark.parametrize("tool", sorted(CASES))
def test_missing_input_is_one_line_naming_it_and_exit_2(results, tool):
    code, err = results[(tool, "file")]
    assert code == 2 and err.count("\n") == 1, err
    assert err.startswith(f"{tool}: error: ") and CASES[tool][2] in err, err
