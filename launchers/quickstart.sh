#!/usr/bin/env bash
# Interim quickstart (replaced by the full pretraining job once the training engine lands):
# sets up the environment and prints every preset's per-layer norm positions and sizes.
set -euo pipefail
cd "$(dirname "$0")/.."
source launchers/setup_env.sh
for preset in 9m 71m 130m 250m 1b 7b; do
    echo "=== $preset (Mix-LN, paper's k) ==="
    python tools/model_summary.py --preset "$preset" --norm-position mix | grep -E "^(layers|norm positions|parameters)"
done
