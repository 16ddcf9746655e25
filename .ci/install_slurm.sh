#!/usr/bin/env bash
# Installs what tests/test_slurm.py needs: Debian/Ubuntu's slurm-wlm daemons and client (22.05 on Debian 12) and
# munge. The tests start their own private munged/slurmctld/slurmd (tests/slurm_cluster.py: config, key, socket and
# state in a temporary directory, free ports), so nothing is configured or started here.
# Usage (as root, or a user with sudo):  bash .ci/install_slurm.sh
set -euo pipefail

need=(munged slurmctld slurmd sbatch scontrol sinfo srun scancel squeue)
missing=()
for b in "${need[@]}"; do
    command -v "$b" >/dev/null 2>&1 || [ -x "/usr/sbin/$b" ] || missing+=("$b")
done
if [ "${#missing[@]}" -eq 0 ]; then
    echo "slurm + munge already installed: $(slurmd -V)"
    exit 0
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
# the packages' init scripts may fail to start the daemons (no systemd in containers, no slurm.conf): harmless
$SUDO apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge
echo "installed: $(slurmd -V), $(munged --version 2>&1 | head -n1)"
