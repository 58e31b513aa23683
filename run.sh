#!/usr/bin/env bash
# Placeholder until the training program lands (issue 5): checks the install and MPI.
set -euo pipefail
cd "$(dirname "$0")"
mpiexec -n 2 python -c "from mpi4py import MPI; import ssmpi; print('rank', MPI.COMM_WORLD.rank, 'ssmpi', ssmpi.__version__)"
