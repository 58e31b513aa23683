#!/usr/bin/env bash
# slurm-local.sh - throwaway single-node Slurm for the tests (Debian bookworm, Slurm 22.05).
# Copied from the shared recipe (tools/slurm-local.sh) so that a checkout does not depend on
# it; changes: no venv (the jobs use the Python that runs the tests), configurable ports,
# install prints what it did, fresh job ids per instance and removal of the MPICH
# segments of this instance's killed jobs (see pick_first_job_id).
# No systemd, no munge daemon (auth/none), no accounting DB, no cgroups.
#   slurm-local.sh install   # apt-get slurmctld slurmd slurm-client when missing
#   slurm-local.sh up        # write config (fresh FirstJobId), start slurmctld + slurmd,
#                            # wait until node idle
#   slurm-local.sh down      # cancel jobs, stop the two daemons by PID, wait for them,
#                            # remove the /dev/shm segments of this instance's killed steps
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

# MPICH under `srun --mpi=pmi2` names its shared-memory segment after the job step:
# /dev/shm/mpich_shm_<FNV-1a hash of "JOBID.STEPID", %x>_<node> (and mpich_vci_... with
# several VCIs). A rank killed with SIGKILL leaves it behind, and every later step with the
# same ids then spins in MPI_Init until its time limit. Slurm numbers jobs from FirstJobId
# (default 1) each time it starts from empty state, so each instance starts at job ids that
# no earlier instance on this machine used, and `down` removes the segments of its own steps.
JOBID_FILE=${SLURM_LOCAL_JOBID_FILE:-/var/tmp/slurm-local.next-job-id}
JOBID_SPAN=1000                      # ids reserved per instance (a test module submits ~10)
MAX_JOB_ID=67043328                  # Slurm's default MaxJobId

pick_first_job_id() {  # print a FirstJobId; reserve JOBID_SPAN ids from it
  # the clock (seconds, modulo the id range), or past the last instance's reservation when
  # that is later (instances started in the same second, or running side by side); the
  # counter file, under flock, only needs to outlive /dev/shm's segments (a reboot ends both)
  local fd clock next first
  clock=$(( $(date +%s) % (MAX_JOB_ID - 2 * JOBID_SPAN) + JOBID_SPAN ))
  mkdir -p "$(dirname "$JOBID_FILE")"
  exec {fd}>>"$JOBID_FILE"
  flock -w 30 "$fd" || { log "no lock on $JOBID_FILE after 30 s"; return 1; }
  next=$(head -c 12 "$JOBID_FILE" | tr -dc 0-9); next=$(( 10#${next:-0} ))
  first=$(( next > clock ? next : clock ))
  (( first + JOBID_SPAN < MAX_JOB_ID )) || first=$JOBID_SPAN   # wrapped (after ~67,000 instances)
  echo $(( first + JOBID_SPAN )) > "$JOBID_FILE"
  exec {fd}>&-
  echo "$first"
}

fnv1a() {  # fnv1a STRING: 32-bit FNV-1a as MPICH's HASH_FNV computes it, in %x
  local s=$1 h=2166136261 i c
  for ((i = 0; i < ${#s}; i++)); do
    printf -v c %d "'${s:i:1}"
    h=$(( ((h ^ c) * 16777619) & 0xffffffff ))
  done
  printf %x "$h"
}

remove_own_segments() {  # the MPICH segments of this instance's steps (their processes are gone)
  local first step j h f removed=""
  first=$(cat "$ROOT/first_job_id" 2>/dev/null) || return 0
  # every step that this instance's slurmd launched; the id range excludes earlier instances
  # that used the same ROOT (their lines are in the same log)
  for step in $(grep -ohP 'launch task StepId=\K[0-9]+\.[0-9]+' "$ROOT/log/slurmd.log" \
                2>/dev/null | sort -u); do
    j=${step%.*}
    (( j >= first && j < first + JOBID_SPAN )) || continue
    h=$(fnv1a "$step")
    for f in /dev/shm/mpich_shm_"$h"_[0-9]* /dev/shm/mpich_vci_"$h"_[0-9]*; do
      [ -f "$f" ] || continue
      rm -f -- "$f" && removed="$removed ${f#/dev/shm/} (step $step)"
    done
  done
  if [ -n "$removed" ]; then log "down: removed segments of this instance's killed steps:$removed"; fi
  rm -f "$ROOT/first_job_id"
}

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
  FIRST_JOB_ID=${FIRST_JOB_ID:-$(pick_first_job_id)}
  echo "$FIRST_JOB_ID" > "$ROOT/first_job_id"
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
# fresh job ids for every instance: see pick_first_job_id
FirstJobId=$FIRST_JOB_ID
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
  log "up: FirstJobId=$FIRST_JOB_ID (ids $FIRST_JOB_ID..$((FIRST_JOB_ID + JOBID_SPAN - 1)) reserved in $JOBID_FILE; no earlier instance here used them)"
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
  remove_own_segments
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
