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
pip_quiet() {  # pip, minus the "find-links location is ignored" noise some machines' pip.conf causes
    "$VENV/bin/python" -m pip "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
}
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    echo "[setup] installing dependencies into $VENV (first run: a few minutes)"
    pip_quiet install -q --upgrade pip
    # A CUDA torch that is already installed is kept; otherwise the pinned CPU build.
    if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
        pip_quiet install -q -c "$ROOT/constraints-cpu.txt" torch
    fi
    # Every other package at the version the tests ran with (constraints-cpu.txt), and torch pinned to
    # whatever is installed now, so no requirement can swap a CUDA build for another one.
    constraints="$(mktemp)"
    grep -v '^torch==' "$ROOT/constraints-cpu.txt" > "$constraints"
    "$VENV/bin/python" -c "import torch; print('torch==' + torch.__version__.split('+')[0])" >> "$constraints"
    DS_BUILD_OPS=0 pip_quiet install -q -c "$constraints" -r "$ROOT/requirements.txt"
    rm -f "$constraints"
    pip_quiet install -q --no-deps -e "$ROOT"
    echo "$want" > "$stamp"
fi
export VENV
export PATH="$VENV/bin:$PATH"
