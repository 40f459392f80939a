"""Without the project's environment the launchers stop at once and say how to create it, instead of
falling back to the system python3 (which then dies with `No module named 'deepspeed'`)."""
import os
import subprocess

import pytest

from training_testlib import REPO

LAUNCHERS = ["launchers/deepspeed_pretrain.sh", "launchers/torchrun_pretrain.sh"]


def _run(launcher, venv):
    env = {k: v for k, v in os.environ.items() if k != "VENV"}
    env["VENV"] = str(venv)
    return subprocess.run(["bash", os.path.join(REPO, launcher), "--train-iters", "1"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_missing_environment_names_the_setup_command(launcher, tmp_path):
    proc = _run(launcher, tmp_path / "no_venv")
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.count("\n") == 1, proc.stderr
    assert f"no Python environment at {tmp_path / 'no_venv'}" in proc.stderr
    assert "bash launchers/setup_env.sh" in proc.stderr and "source .venv/bin/activate" in proc.stderr
    assert "VENV=" in proc.stderr


@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_environment_without_the_requirements_names_the_setup_command(launcher, tmp_path):
    """A python that exists but has no site-packages (-S): torch/deepspeed are missing."""
    python = tmp_path / "venv" / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.write_text("#!/bin/sh\nexec /usr/bin/env python3 -S \"$@\"\n")
    python.chmod(0o755)
    proc = _run(launcher, tmp_path / "venv")
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert "cannot import torch and deepspeed" in proc.stderr and "bash launchers/setup_env.sh" in proc.stderr
    assert "No module named" not in proc.stderr
