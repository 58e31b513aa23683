#!/usr/bin/env bash
# slurm-local.sh - throwaway single-node Slurm for the tests (Debian bookworm, Slurm 22.05).
# Copied from the shared recipe (tools/slurm-local.sh) so that a checkout does not depend on
# it; changes: no venv (the jobs use the Python that runs the tests), configurable ports,
# install prints what it did.
# No systemd, no munge daemon (auth/none), no accounting DB, no cgroups.
#   slurm-local.sh install   # apt-get slurmctld slurmd slurm-client when missing
#   slurm-local.sh up        # write config, start slurmctld + slurmd, wait until node idle
#   slurm-local.sh down      # cancel jobs, stop the two daemons by PID, wait for them
#   slurm-local.sh selftest  # up, run an 8-rank mpiexec sbatch job + srun --mpi=pmi2, down
# Every client command needs:  export SLURM_CONF=$ROOT/slurm.conf
# In a test:  slurm-local.sh up; trap 'slurm-local.sh down' EXIT
#             SLURM_CONF=/tmp/slurmtest/slurm.conf sbatch -W job.sbatch  # blocks; rc = job's rc
set -euo pipefail
ROOT=${SLURM_LOCAL_ROOT:-/tmp/slurmtest}
CPUS=${SLURM_LOCAL_CPUS:-8}          # advertised CPUs, independent of real cores
NODE=$(hostname -s)
export SLURM_CONF=$ROOT/slurm.conf
SBIN=/usr/sbin

log() { printf '[slurm-local %s] %s\n' "$(date +%T)" "$*" >&2; }

install() {
  if command -v sbatch >/dev/null && [ -x $SBIN/slurmd ] && [ -x $SBIN/slurmctld ]; then
    log "install: SLURM already installed (slurm-client $(dpkg-query -W -f='${Version}' slurm-client 2>/dev/null)); nothing to do"
    return 0
  fi
  if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
    log "install: needs root and apt-get to install slurmctld slurmd slurm-client"; return 1
  fi
  log "install: apt-get install slurmctld slurmd slurm-client"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    slurmctld slurmd slurm-client >/dev/null   # pulls munge, slurm-wlm-basic-plugins
  log "install: installed slurm-client $(dpkg-query -W -f='${Version}' slurm-client 2>/dev/null)"
}

write_conf() {
  local mem; mem=$(( $(awk '/MemTotal/{print $2}' /proc/meminfo) / 1024 - 512 ))
  mkdir -p "$ROOT"/{state,spool,log}
  : > "$ROOT/plugstack.conf"          # keep /etc/slurm/plugstack.conf out of it
  cat > "$SLURM_CONF" <<EOF
ClusterName=ci
SlurmctldHost=$NODE(127.0.0.1)
SlurmUser=root
SlurmdUser=root
SlurmctldPort=${SLURM_LOCAL_CTLD_PORT:-6817}
SlurmdPort=${SLURM_LOCAL_D_PORT:-6818}
AuthType=auth/none
CredType=cred/none
# a requeued job may restart only cred_expire+1 s later (default 120 s)
AuthInfo=cred_expire=${SLURM_LOCAL_CRED_EXPIRE:-5}
# fast scheduling for tests (defaults: main loop every 60 s, backfill every 30 s)
SchedulerParameters=sched_interval=1,bf_interval=1
StateSaveLocation=$ROOT/state
SlurmdSpoolDir=$ROOT/spool
SlurmctldPidFile=$ROOT/slurmctld.pid
SlurmdPidFile=$ROOT/slurmd.pid
SlurmctldLogFile=$ROOT/log/slurmctld.log
SlurmdLogFile=$ROOT/log/slurmd.log
PlugStackConfig=$ROOT/plugstack.conf
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
ReturnToService=2
SlurmdParameters=config_overrides
MinJobAge=300
KillWait=5
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$CPUS Boards=1 SocketsPerBoard=1 CoresPerSocket=$CPUS ThreadsPerCore=1 RealMemory=$mem State=UNKNOWN
PartitionName=${SLURM_LOCAL_PARTITION:-debug} Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
EOF
}

up() {
  [ -s "$ROOT/ctld.mypid" ] && kill -0 "$(cat "$ROOT/ctld.mypid")" 2>/dev/null && { log "already up"; return; }
  rm -rf "$ROOT/state" "$ROOT/spool"
  write_conf
  # -D: stay in foreground so $! is the daemon's PID; setsid: own process group
  setsid $SBIN/slurmctld -D -f "$SLURM_CONF" >"$ROOT/log/slurmctld.out" 2>&1 < /dev/null &
  echo $! > "$ROOT/ctld.mypid"
  setsid $SBIN/slurmd -D -N "$NODE" -f "$SLURM_CONF" >"$ROOT/log/slurmd.out" 2>&1 < /dev/null &
  echo $! > "$ROOT/d.mypid"
  for _ in $(seq 1 150); do           # <= 30 s
    [ "$(sinfo -h -n "$NODE" -o %T 2>/dev/null)" = idle ] && { log "up: $(sinfo -h -o '%P %D %c %T')"; return; }
    sleep 0.2
  done
  log "node never became idle"; tail -n 20 "$ROOT"/log/*.log >&2; return 1
}

stop_pids() {  # stop_pids PIDFILE...: SIGTERM each PID, wait <=15 s, then SIGKILL
  local f pids="" p
  for f in "$@"; do [ -s "$f" ] && pids="$pids $(cat "$f")"; rm -f "$f"; done
  for p in $pids; do kill "$p" 2>/dev/null || true; done
  for _ in $(seq 1 75); do
    local alive=""; for p in $pids; do kill -0 "$p" 2>/dev/null && alive="$alive $p"; done
    [ -z "$alive" ] && return 0; sleep 0.2
  done
  log "SIGKILL$alive"; kill -9 $alive 2>/dev/null || true
}

descendants() {  # all descendant PIDs of $1
  local c; for c in $(ps -o pid= --ppid "$1"); do echo "$c"; descendants "$c"; done
}

down() {
  if [ -s "$ROOT/ctld.mypid" ] && kill -0 "$(cat "$ROOT/ctld.mypid")" 2>/dev/null; then
    local ids; ids=$(squeue -h -o %i 2>/dev/null || true)
    if [ -n "$ids" ]; then
      scancel $ids || true
      for _ in $(seq 1 50); do [ -z "$(squeue -h -o %i 2>/dev/null)" ] && break; sleep 0.2; done
    fi
  fi
  stop_pids "$ROOT/d.mypid" "$ROOT/ctld.mypid"
  # safety net, only if slurmd died abnormally: step daemons of *this* instance
  # (reparented to PID 1, recognised by SLURM_CONF in their environment) and
  # their process trees, killed by PID
  local e p victims=""
  for e in /proc/[0-9]*/exe; do
    [ "$(readlink "$e" 2>/dev/null)" = "$(readlink -f $SBIN/slurmstepd)" ] || continue
    p=${e#/proc/}; p=${p%/exe}
    tr '\0' '\n' < "/proc/$p/environ" 2>/dev/null | grep -qx "SLURM_CONF=$SLURM_CONF" || continue
    victims="$victims $p $(descendants "$p" | tr "\n" " ")"
  done
  if [ -n "${victims// }" ]; then
    log "SIGKILL leftover step processes:$victims"; kill -9 $victims 2>/dev/null || true
  fi
  log "down"
}

wait_job() {  # wait_job JOBID [TIMEOUT_S] -> prints final state, rc 0 iff COMPLETED/0:0
  local j=$1 t=${2:-300} st line
  for _ in $(seq 1 $((t * 5))); do
    line=$(scontrol show job "$j" -o 2>/dev/null) || true
    st=$(grep -oP 'JobState=\K\S+' <<<"$line" || true)
    case $st in PENDING|RUNNING|CONFIGURING|COMPLETING|SUSPENDED|REQUEUED|'') sleep 0.2 ;; *) break ;; esac
  done
  echo "$st $(grep -oP 'ExitCode=\S+' <<<"$line")"
  [ "$st" = COMPLETED ]
}

selftest() {
  local t0=$SECONDS; trap down EXIT; up; log "up took $((SECONDS - t0)) s"
  mkdir -p "$ROOT/jobs"
  cat > "$ROOT/jobs/mpi.sbatch" <<EOF
#!/bin/bash
#SBATCH -J mpi8
#SBATCH -n 8
#SBATCH -t 5
#SBATCH -o $ROOT/jobs/%x-%j.out
P="import sys; from mpi4py import MPI; c=MPI.COMM_WORLD; sys.stdout.write(f'rank {c.rank} of {c.size}\\n')"
mpiexec -n 8 ${PYTHON:-python3} -c "\$P"
srun -n 8 --mpi=pmi2 ${PYTHON:-python3} -c "\$P"
EOF
  local j ok=1; j=$(sbatch --parsable "$ROOT/jobs/mpi.sbatch")
  wait_job "$j" 120 || ok=0; cat "$ROOT/jobs/mpi8-$j.out"
  [ $ok = 1 ] && [ "$(grep -o 'of 8' "$ROOT/jobs/mpi8-$j.out" | wc -l)" -eq 16 ] \
    && log "selftest OK in $((SECONDS - t0)) s" || { log "selftest FAILED"; return 1; }
}

case ${1:-} in
  install|up|down|selftest|write_conf) "$1" ;;
  wait) shift; wait_job "$@" ;;
  *) echo "usage: $0 install|up|down|selftest|wait JOBID [TIMEOUT]" >&2; exit 2 ;;
esac
