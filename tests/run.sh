#!/usr/bin/env bash
# Sets up (or reuses) the virtual environment and runs the whole test suite on CPU.
#   bash tests/run.sh                 # everything
#   bash tests/run.sh tests/model -x  # extra arguments go to pytest
set -euo pipefail
cd "$(dirname "$0")/.."
source launchers/setup_env.sh
bash launchers/install_slurm.sh  # Debian's slurm-wlm + munge for tests/slurm (as root; else they skip)
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} TOKENIZERS_PARALLELISM=false WANDB_MODE=offline
export PYTHONHASHSEED=0
"$VENV/bin/python" -m pytest -q -p no:cacheprovider --timeout=900 "${@:-tests}"
