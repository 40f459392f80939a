"""launchers/setup_env.sh on a first install, with a recording stand-in for the venv's python (pip and torch
are not really installed): numpy goes in before torch is first imported (else torch prints "Failed to
initialize NumPy"), pip's harmless extras warning is not shown, the torch build is named, a machine
without a GPU is told how to choose the CPU build, and TORCH_INDEX_URL installs torch from that index."""
import os
import subprocess

import pytest

from training_testlib import REPO

# The stand-in: logs every pip call; "import torch" fails until pip installed torch and warns as torch
# does when numpy is missing; the version queries answer like a CPU torch 2.13.0.
FAKE_PYTHON = r"""#!/usr/bin/env bash
state="$(dirname "$0")/../state"; mkdir -p "$state"
if [ "$1" = "-m" ] && [ "$2" = "pip" ]; then
    shift 2; echo "pip $*" >> "$state/log"
    case " $* " in *" -r "*) echo "WARNING: mbstrdecoder 1.1.5 does not provide the extra 'all'" >&2;; esac
    case " $* " in *" numpy "*) touch "$state/numpy";; esac
    case " $* " in *" torch "*) touch "$state/torch";; esac
    case " $* " in *" -e "*) echo "Successfully installed megatron-mixln-0.1.0";; esac
    exit 0
fi
if [ "$1" = "-c" ]; then
    case "$2" in *"import torch"*)
        echo "import torch" >> "$state/log"
        [ -f "$state/torch" ] || { echo "ModuleNotFoundError: No module named 'torch'" >&2; exit 1; }
        [ -f "$state/numpy" ] || echo "UserWarning: Failed to initialize NumPy: No module named 'numpy'" >&2
        case "$2" in *"'torch=='"*) echo "torch==2.13.0";; *"[setup] torch"*) echo "[setup] torch 2.13.0+cpu: CPU build";; esac
        exit 0;;
    esac
fi
echo "unexpected: $*" >&2; exit 9
"""


def _setup(tmp_path, gpu=False, **env_extra):
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").write_text(FAKE_PYTHON)
    (venv / "bin" / "python").chmod(0o755)
    tools = tmp_path / "tools"
    tools.mkdir()
    if gpu:
        (tools / "nvidia-smi").write_text("#!/bin/sh\nexit 0\n")
        (tools / "nvidia-smi").chmod(0o755)
    path = ":".join([str(tools), "/usr/bin", "/bin"])  # no real nvidia-smi, whatever this machine has
    env = {"HOME": str(tmp_path), "PATH": path, "VENV": str(venv), **env_extra}
    proc = subprocess.run(["bash", os.path.join(REPO, "launchers/setup_env.sh")], env=env, capture_output=True,
                          text=True, timeout=60)
    log = (venv / "state" / "log").read_text().splitlines()
    return proc, log


def test_first_install_without_a_gpu(tmp_path):
    proc, log = _setup(tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == "", proc.stderr  # no NumPy warning, no extras warning, no editable-install banner
    assert "Successfully installed" not in proc.stdout
    numpy_install = next(i for i, line in enumerate(log) if line.startswith("pip install") and " numpy" in line)
    assert numpy_install < log.index("import torch")
    torch_install = [line for line in log if line.startswith("pip install") and line.endswith(" torch")]
    assert len(torch_install) == 1 and "--extra-index-url" not in torch_install[0]
    assert "no GPU found" in proc.stdout and "the CUDA build" in proc.stdout
    assert "TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu bash launchers/setup_env.sh" in proc.stdout
    assert "[setup] torch 2.13.0+cpu: CPU build" in proc.stdout
    again = subprocess.run(["bash", os.path.join(REPO, "launchers/setup_env.sh")], capture_output=True, text=True,
                           env={"HOME": str(tmp_path), "PATH": "/usr/bin:/bin", "VENV": str(tmp_path / "venv")})
    assert again.returncode == 0 and again.stdout == "" and again.stderr == ""  # the stamp: nothing to do


@pytest.mark.parametrize("gpu", [False, True])
def test_torch_index_url_and_a_gpu_machine(tmp_path, gpu):
    extra = {} if gpu else {"TORCH_INDEX_URL": "https://download.pytorch.org/whl/cpu"}
    proc, log = _setup(tmp_path, gpu=gpu, **extra)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    torch_install = next(line for line in log if line.startswith("pip install") and line.endswith(" torch"))
    assert "no GPU found" not in proc.stdout
    if gpu:
        assert "--extra-index-url" not in torch_install and "(from PyPI on Linux: the CUDA build)" in proc.stdout
    else:
        assert "--extra-index-url https://download.pytorch.org/whl/cpu" in torch_install
        assert "installing torch==2.13.0 from https://download.pytorch.org/whl/cpu" in proc.stdout
