#!/usr/bin/env bash
# jobs/lib.sh - what every job script does inside its allocation. Sourced, not run:
#   source "${SSMPI_HOME:-$SLURM_SUBMIT_DIR}/jobs/lib.sh"
#   ssmpi_env                       # cd to the repository, modules, venv, threads
#   ssmpi_train CONFIG [ARGS...]    # launch python -m ssmpi.train on every task
#
# Pre-timeout checkpoint and requeue: the job scripts ask for --signal=B:USR1@<lead>, so
# SLURM signals this batch shell <lead> seconds before the time limit. The shell forwards
# SIGUSR1 to every rank (scancel --signal=USR1 reaches all processes of the job's steps,
# whichever launcher started them); each rank finishes its step, the trainer writes a
# checkpoint and exits 99; the shell turns 99 into `scontrol requeue`, and the requeued job
# (SLURM_RESTART_COUNT >= 1) runs with --resume. A plain --signal=USR1@<lead> (no B:) or
# `scancel --signal=USR1 JOBID` reaches the ranks directly and works the same way.

_ssmpi_log() { printf '[ssmpi-job %s] %s\n' "$(date +%T)" "$*" >&2; }
_ssmpi_die() { _ssmpi_log "error: $*"; exit 2; }

SSMPI_HOME=${SSMPI_HOME:-${SLURM_SUBMIT_DIR:-$PWD}}
[ -f "$SSMPI_HOME/jobs/site.sh" ] || _ssmpi_die "$SSMPI_HOME is not the ssmpi repository " \
  "(submit from the repository root, or set SSMPI_HOME)"
# shellcheck source=jobs/site.sh
source "$SSMPI_HOME/jobs/site.sh"

ssmpi_env() {  # the software environment of every rank (exported to the tasks)
  cd "$SSMPI_HOME"
  if [ -n "$SSMPI_MODULES" ]; then
    command -v module >/dev/null 2>&1 || _ssmpi_die "SSMPI_MODULES is set but 'module' is missing"
    # shellcheck disable=SC2086
    module load $SSMPI_MODULES
  fi
  if [ -n "$SSMPI_VENV" ]; then
    # shellcheck disable=SC1091
    source "$SSMPI_VENV/bin/activate"
  fi
  # one BLAS thread per core that SLURM gave each rank (ssmpi leaves a user's choice alone)
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}
  export PYTHONUNBUFFERED=1
}

ssmpi_launch() {  # ssmpi_launch CMD... : CMD on every task of the allocation, in the background
  case "$SSMPI_LAUNCHER" in
    srun)
      srun --mpi="$SRUN_MPI" --kill-on-bad-exit=1 "$@" &
      ;;
    mpiexec)
      # MPICH's and Open MPI's mpiexec read the allocation (nodes, tasks per node) from
      # SLURM and start one daemon per node with srun
      mpiexec -n "${SLURM_NTASKS:?}" "$@" &
      ;;
    *) _ssmpi_die "SSMPI_LAUNCHER=$SSMPI_LAUNCHER: expected srun or mpiexec" ;;
  esac
  SSMPI_LAUNCH_PID=$!
}

_ssmpi_forward() {  # a signal for this shell -> SIGUSR1 to every rank: checkpoint and stop
  _ssmpi_log "SIG$1: asking every rank to checkpoint and stop"
  SSMPI_STOP_ASKED=1
  scancel --signal=USR1 "$SLURM_JOB_ID" || _ssmpi_log "scancel --signal=USR1 failed"
}

ssmpi_wait() {  # wait for the launcher, through trapped signals; sets SSMPI_RC
  local pid=$SSMPI_LAUNCH_PID
  set +e
  while kill -0 "$pid" 2>/dev/null; do
    wait "$pid"
  done
  wait "$pid"
  SSMPI_RC=$?
  set -e
}

ssmpi_train() {  # ssmpi_train CONFIG [ARGS...]: train, requeue on exit 99
  local config=$1
  shift
  [ -f "$config" ] || _ssmpi_die "config $config not found (submit from the repository root)"
  local resume=()
  if [ "${SLURM_RESTART_COUNT:-0}" -gt 0 ] || [ "${SSMPI_RESUME:-0}" = 1 ]; then
    resume=(--resume)
  fi
  SSMPI_STOP_ASKED=0
  trap '_ssmpi_forward USR1' USR1
  trap '_ssmpi_forward TERM' TERM
  _ssmpi_log "job ${SLURM_JOB_ID:-?} restart ${SLURM_RESTART_COUNT:-0} on" \
    "${SLURM_JOB_NODELIST:-?}: ${SLURM_NTASKS:-?} ranks via $SSMPI_LAUNCHER;" \
    "$SSMPI_PYTHON -m ssmpi.train --config $config ${resume[*]} $*"
  ssmpi_launch "$SSMPI_PYTHON" -m ssmpi.train --config "$config" "${resume[@]}" "$@"
  ssmpi_wait
  trap - USR1 TERM
  case $SSMPI_RC in
    0) _ssmpi_log "training finished" ;;
    99)
      if [ "${SSMPI_NO_REQUEUE:-0}" = 1 ]; then
        _ssmpi_log "stopped with a checkpoint (exit 99); SSMPI_NO_REQUEUE=1: not requeued"
        exit 99
      fi
      _ssmpi_log "stopped with a checkpoint (exit 99): scontrol requeue $SLURM_JOB_ID"
      if scontrol requeue "$SLURM_JOB_ID"; then
        exit 0
      fi
      _ssmpi_log "requeue refused; resubmit this script: it continues from the checkpoint" \
        "when SLURM_RESTART_COUNT > 0, or pass --resume"
      exit 99
      ;;
    *)
      _ssmpi_log "training failed (exit $SSMPI_RC); see the messages above"
      exit "$SSMPI_RC"
      ;;
  esac
}
