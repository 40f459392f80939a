#!/usr/bin/env bash
# Installs Debian's Slurm (slurm-wlm, 22.05 on bookworm) and munge when they are missing, for the
# tests' private cluster (slurm/local_cluster.sh). Called by tests/run.sh; needs root and apt-get.
# Where that is impossible it says so in one line and returns 0: the Slurm tests then skip, naming why.
set -uo pipefail
need=(slurmctld slurmd munged sbatch srun scontrol unshare nsenter ip)
missing() { for p in "${need[@]}"; do command -v "$p" >/dev/null || { echo "$p"; return; }; done; }
[ -z "$(missing)" ] && exit 0
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
    echo "[setup] $(missing) not found and cannot install (needs root and apt-get): the Slurm tests will skip"
    exit 0
fi
echo "[setup] installing slurm-wlm and munge (apt-get) for the Slurm tests"
export DEBIAN_FRONTEND=noninteractive
apt-get install -y -q slurm-wlm munge iproute2 util-linux procps >/dev/null \
    || { apt-get update -q >/dev/null && apt-get install -y -q slurm-wlm munge iproute2 util-linux procps >/dev/null; } \
    || echo "[setup] apt-get install slurm-wlm munge failed: the Slurm tests will skip"
exit 0
