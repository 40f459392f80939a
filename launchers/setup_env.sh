#!/usr/bin/env bash
# Creates or reuses the project's virtualenv (.venv, or $VENV) and installs the pinned
# dependencies. Sourced by launchers/quickstart.sh and tests/run.sh; idempotent and quick
# when nothing changed (a stamp file records the hash of the requirement files).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV:-$ROOT/.venv}"
PYTHON="${PYTHON:-python3}"
if [ ! -x "$VENV/bin/python" ]; then
    echo "[setup] creating virtualenv $VENV"
    "$PYTHON" -m venv "$VENV"
fi
stamp="$VENV/.megatron_mixln_stamp"
want="$(cat "$ROOT/requirements.txt" "$ROOT/constraints-cpu.txt" "$ROOT/pyproject.toml" | sha256sum | cut -d' ' -f1)"
pip_quiet() {
    # pip minus two harmless lines: the "find-links location is ignored" note some machines' pip.conf
    # causes, and "X does not provide the extra 'all'" (an lm_eval dependency asks mbstrdecoder[all],
    # which has no extras: nothing is missing).
    "$VENV/bin/python" -m pip "$@" 2> >(grep -v -e "is ignored: it is neither a file nor a directory" \
                                            -e "does not provide the extra" >&2)
}
torch_pin="$(grep '^torch==' "$ROOT/constraints-cpu.txt")"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    echo "[setup] installing dependencies into $VENV (first run: a few minutes)"
    pip_quiet install -q --upgrade pip
    # numpy first: importing torch without it prints "Failed to initialize NumPy".
    pip_quiet install -q -c "$ROOT/constraints-cpu.txt" numpy
    # A torch that is already installed (e.g. your CUDA build) is kept; otherwise the pinned version.
    if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
        if [ -n "${TORCH_INDEX_URL:-}" ]; then
            echo "[setup] installing $torch_pin from $TORCH_INDEX_URL"
            pip_quiet install -q -c "$ROOT/constraints-cpu.txt" --extra-index-url "$TORCH_INDEX_URL" torch
        else
            if ! command -v nvidia-smi >/dev/null 2>&1; then
                echo "[setup] no GPU found. Installing $torch_pin from your pip's index; from PyPI on Linux that is"
                echo "[setup] the CUDA build (~2.5 GB with its nvidia-* packages). For the CPU build (~200 MB), if"
                echo "[setup] this machine can reach PyTorch's wheels, stop and run instead:"
                echo "[setup]   TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu bash launchers/setup_env.sh"
            else
                echo "[setup] installing $torch_pin from your pip's index (from PyPI on Linux: the CUDA build)"
            fi
            pip_quiet install -q -c "$ROOT/constraints-cpu.txt" torch
        fi
    fi
    # Every other package at the version the tests ran with (constraints-cpu.txt), and torch pinned to
    # whatever is installed now, so no requirement can swap a CUDA build for another one.
    constraints="$(mktemp)"
    grep -v '^torch==' "$ROOT/constraints-cpu.txt" > "$constraints"
    "$VENV/bin/python" -c "import torch; print('torch==' + torch.__version__.split('+')[0])" >> "$constraints"
    DS_BUILD_OPS=0 pip_quiet install -q -c "$constraints" -r "$ROOT/requirements.txt"
    rm -f "$constraints"
    # The project itself, editable. setuptools prints an "Editable installation" banner on stderr that is
    # not news: the output is shown only if the install fails.
    if ! editable_out="$("$VENV/bin/python" -m pip install -q --no-deps -e "$ROOT" 2>&1)"; then
        printf '%s\n' "$editable_out" >&2
        exit 1
    fi
    "$VENV/bin/python" -c "import torch; print(f'[setup] torch {torch.__version__}: '
        + (f'CUDA {torch.version.cuda} build' if torch.version.cuda else 'CPU build'))"
    echo "$want" > "$stamp"
fi
export VENV
export PATH="$VENV/bin:$PATH"
