#!/usr/bin/env bash
# Sourced by the launchers (ROOT set): PY = the project environment's python ($VENV, else $ROOT/.venv),
# or stop with what to do. Never falls back to the system python3, which lacks the dependencies.
venv_dir="${VENV:-$ROOT/.venv}"
PY="$venv_dir/bin/python"
if [ ! -x "$PY" ]; then
    echo "$(basename "$0"): no Python environment at $venv_dir; create it with 'bash launchers/setup_env.sh'" \
         "(then 'source .venv/bin/activate' for the tools), or set VENV=/path/to/venv to one with the requirements" >&2
    exit 2
fi
if ! "$PY" -c 'import importlib.util as u, sys; sys.exit(any(u.find_spec(m) is None for m in ("torch", "deepspeed")))'; then
    echo "$(basename "$0"): $PY cannot import torch and deepspeed; install the requirements with" \
         "'bash launchers/setup_env.sh' (VENV=$venv_dir)" >&2
    exit 2
fi
