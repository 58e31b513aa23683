#!/usr/bin/env bash
# Download the wheels that benchmarks/gpu_check.sh installs on a GPU machine without network
# (Python 3.12, x86-64 Linux; that machine has numpy, cupy, torch, h5py, pytest, tqdm and
# threadpoolctl but no MPI library and no pytest-mpi):
#
#   bash benchmarks/gpu_wheels.sh [DIR]        # DIR defaults to .whl (ignored by git)
#
# The exact commands (one version of each package; --no-deps: each dependency is named):
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
#     --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#     --platform manylinux1_x86_64 -d .whl mpich==5.0.2 mpi4py==4.1.2 pytest-mpi==0.6
# mpich: the MPI library and mpiexec (about 13 MB); mpi4py: built against the MPI ABI, so it
# loads the mpich wheel's libmpi (the machine's own mpi4py may not find one); pytest-mpi: the
# --with-mpi plugin of the MPI tests. About 20 MB in all, under the 64 MiB that a device run
# carries.
set -euo pipefail
cd "$(dirname "$0")/.."
DIR="${1:-.whl}"
mkdir -p "$DIR"
PKGS=(mpich==5.0.2 mpi4py==4.1.2 pytest-mpi==0.6)
python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  --platform manylinux1_x86_64 -d "$DIR" "${PKGS[@]}"
ls -l "$DIR"
du -sh "$DIR"
