import os

import pytest


@pytest.fixture(scope="session")
def entry_point_runs(tmp_path_factory):
    """entry_points_testlib.run_all: every entry point run once per bad command line (tests/tools share it)."""
    from entry_points_testlib import ROOT, run_all

    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return run_all(tmp_path_factory.mktemp("entry_points"), env)
