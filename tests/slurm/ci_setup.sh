#!/usr/bin/env bash
# tests/slurm/ci_setup.sh - make the SLURM tests (tests/test_slurm*.py) runnable on a fresh
# CI machine: install slurmctld, slurmd and slurm-client from the Debian archive when they
# are missing (needs root and apt-get), and say what was done. Idempotent; starts nothing
# (each test module starts its own throwaway SLURM and brings it down). Without root or apt
# it installs nothing and exits 0: the SLURM tests then skip, saying why.
#   bash tests/slurm/ci_setup.sh
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
say() { printf '[ci_setup] %s\n' "$*"; }
if command -v sbatch >/dev/null && [ -x /usr/sbin/slurmd ] && [ -x /usr/sbin/slurmctld ]; then
  say "SLURM already installed: slurm-client $(dpkg-query -W -f='${Version}' slurm-client 2>/dev/null); nothing to do"
  exit 0
fi
if [ "$(id -u)" != 0 ]; then
  say "not root: SLURM not installed (the SLURM tests will skip)"
  exit 0
fi
if ! command -v apt-get >/dev/null; then
  say "no apt-get: SLURM not installed (the SLURM tests will skip)"
  exit 0
fi
if bash "$here/slurm-local.sh" install; then
  say "installed: slurm-client $(dpkg-query -W -f='${Version}' slurm-client 2>/dev/null) (slurmctld, slurmd, slurm-client)"
else
  say "apt-get install failed: SLURM not installed (the SLURM tests will skip)"
fi
