#!/usr/bin/env bash
# CI: install a single-node Slurm (slurmctld, slurmd, client tools, basic plugins) and munge for
# tests/test_slurm.py, which starts and stops the daemons itself (tests/slurm/start_slurm.sh).
# Idempotent: does nothing when the programs are already installed. Needs root (apt-get).
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive

required=(slurmctld slurmd sbatch srun squeue sacct scontrol munged mungekey munge unmunge)
missing=()
for program in "${required[@]}"; do
    command -v "$program" >/dev/null 2>&1 || missing+=("$program")
done
if [ ${#missing[@]} -eq 0 ]; then
    echo "slurm_setup: Slurm and munge already installed ($(slurmctld -V))"
    exit 0
fi

echo "slurm_setup: installing slurm-wlm and munge (missing: ${missing[*]})"
# The packages' init scripts may try to start daemons; without a slurm.conf slurmctld/slurmd
# stay down, which is what the test expects (it runs its own from a private state folder).
apt-get update -qq
apt-get install -y -qq --no-install-recommends slurm-wlm munge >/dev/null
for program in "${required[@]}"; do
    command -v "$program" >/dev/null 2>&1 || { echo "slurm_setup: $program still missing" >&2; exit 1; }
done
echo "slurm_setup: installed $(slurmctld -V), $(munged --version)"
