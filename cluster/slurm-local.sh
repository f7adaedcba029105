#!/usr/bin/env bash
# A real, private SLURM on this machine (slurmctld + one or two slurmd + its own munged), for tests
# and for trying distrain's SLURM launch without a cluster. Debian/Ubuntu (slurm-wlm 22.05 + munge).
#
# Usage (start/stop as root; jobs run as whoever submits them):
#   cluster/slurm-local.sh install                     # apt-get install slurm-wlm munge (idempotent)
#   cluster/slurm-local.sh start [--nodes 1|2] [--dir DIR]
#   eval "$(cluster/slurm-local.sh env [--dir DIR])"   # sets SLURM_CONF for sbatch/srun/squeue/...
#   cluster/slurm-local.sh status [--dir DIR]          # sinfo, or "not running" (exit 3)
#   cluster/slurm-local.sh stop [--dir DIR]
#
#   DIR defaults to ${DISTRAIN_SLURM_DIR:-/tmp/distrain-slurm}; everything lives there: munge key,
#   munge socket, slurm.conf, pid files, state/, spool/<node>/, log/. Keep DIR short (<= 60
#   characters): munged and slurmd put unix sockets inside it and socket paths are limited to 107.
#
#   --nodes 1 (default): one node n1 with CPUs=2, so `--ntasks=2` fits on one node.
#   --nodes 2: nodes n1 and n2 with CPUs=1 each, two slurmd on this host (both NodeAddr=127.0.0.1,
#              each on its own port), so `sbatch --nodes=2 --ntasks=2` is a real two-node step
#              (SLURM_STEP_NODELIST=n[1-2]). Both are in the default partition `debug`.
#
# Example, one machine:
#   cluster/slurm-local.sh install && cluster/slurm-local.sh start --nodes 2
#   eval "$(cluster/slurm-local.sh env)"
#   sbatch --wait --nodes=2 --ntasks=2 --wrap 'srun hostname'; echo "exit code $?"
#   cluster/slurm-local.sh stop
#
# Exit codes: 0 ok, 1 failure (start prints the daemon log tails), 2 bad usage, 3 `status`: not
# running.
#
# Settings that depart from a production slurm.conf, and why:
#   - Its own munged, key and socket (AuthInfo=socket=...): never touches the system munge or its
#     key. Client commands find that socket through the AuthInfo line of the SLURM_CONF they read,
#     so SLURM_CONF is all that `env` has to export.
#   - Free ports picked on 127.0.0.1 at each start for slurmctld and each slurmd: never collides
#     with another SLURM (or another copy of this script with a different DIR).
#   - AuthInfo cred_expire=10 and SchedulerParameters=sched_interval=1: make `scontrol requeue`
#     usable in tests. In 22.05 a requeued job goes back to PENDING with Reason=BeginTime and
#     BeginTime = requeue time + cred_expire + 1 (so the old job credential has expired before it
#     runs again); cred_expire defaults to 120 s and values below 5 are rejected. The BeginTime
#     passing is no scheduling event: the job starts at the next full-queue pass of the main
#     scheduler (every sched_interval, default 60 s). Here a requeued job runs again ~11 s after
#     the requeue, with SLURM_RESTART_COUNT=1 (unset on the first run).
#   - MinJobAge=4: `sbatch --wait` polls slurmctld after 2 s and then multiplies its sleep by 4 (8 s,
#     32 s) unless the sleep is >= MinJobAge/2; with 4 it keeps polling every 2 s, so a test does not
#     wait up to 30 s after its job ended. Finished jobs stay visible to `scontrol show job` for at
#     least 4 s (slurmctld purges old jobs in a periodic pass, so usually longer).
#   - slurmctld -c: starts without the jobs of an earlier start (job ids still continue from the
#     last one, so output files named after %j are not overwritten).
#   - Accounting off, ProctrackType=proctrack/linuxproc, TaskPlugin=task/none: no slurmdbd and no
#     cgroups (works inside containers).
set -euo pipefail

SCRIPT_NAME=$(basename "$0")
readonly SCRIPT_NAME
readonly DEFAULT_DIR=${DISTRAIN_SLURM_DIR:-/tmp/distrain-slurm}
readonly MAX_DIR_LEN=60
readonly START_TIMEOUT=30   # seconds to wait for the nodes to become idle
readonly STOP_TIMEOUT=20    # seconds to wait for cancelled jobs, then for the daemons after SIGTERM

# help: the whole header comment on stdout. usage: its Usage block on stderr, exit 2.
help() { sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0"; exit 0; }
usage() {
  sed -n '/^# Usage/,/^#$/{/^#$/d;s/^# \{0,1\}//;p}' "$0" >&2
  echo "(more: $SCRIPT_NAME --help)" >&2
  exit 2
}

die() { echo "$SCRIPT_NAME: $*" >&2; exit 1; }

# --- install ------------------------------------------------------------------------------------

pkg_installed() {
  [[ $(dpkg-query -W -f='${db:Status-Status}' "$1" 2>/dev/null || true) == installed ]]
}

cmd_install() {
  [[ $# -eq 0 ]] || usage
  local pkgs=(slurm-wlm munge) missing=() p log
  for p in "${pkgs[@]}"; do pkg_installed "$p" || missing+=("$p"); done
  [[ ${#missing[@]} -eq 0 ]] && return 0
  [[ $(id -u) -eq 0 ]] || die "install needs root (apt-get install ${missing[*]})"
  log=$(mktemp)
  # The Debian packages start the system slurmctld/slurmd/munge services on install (when an init
  # system runs); those use /etc/slurm and the default ports and do not disturb ours.
  if ! { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}"; } \
      >"$log" 2>&1; then
    tail -n 30 "$log" >&2
    rm -f "$log"
    die "apt-get install ${missing[*]} failed"
  fi
  rm -f "$log"
}

# --- shared helpers -----------------------------------------------------------------------------

# parse_opts ARGS...: sets DIR (absolute), CONF and NODES from --dir/--nodes; ALLOW_NODES=1 permits --nodes.
parse_opts() {
  DIR=$DEFAULT_DIR
  NODES=1
  while [[ $# -gt 0 ]]; do
    case $1 in
      --dir) [[ $# -ge 2 ]] || usage; DIR=$2; shift 2 ;;
      --dir=*) DIR=${1#--dir=}; shift ;;
      --nodes) [[ $# -ge 2 && ${ALLOW_NODES:-0} == 1 ]] || usage; NODES=$2; shift 2 ;;
      --nodes=*) [[ ${ALLOW_NODES:-0} == 1 ]] || usage; NODES=${1#--nodes=}; shift ;;
      -h|--help) help ;;
      *) echo "$SCRIPT_NAME: unknown argument: $1" >&2; usage ;;
    esac
  done
  [[ $NODES == 1 || $NODES == 2 ]] || { echo "$SCRIPT_NAME: --nodes must be 1 or 2, not '$NODES'" >&2; exit 2; }
  [[ -n $DIR ]] || usage
  [[ $DIR == /* ]] || DIR=$PWD/$DIR
  DIR=${DIR%/}
  CONF=$DIR/slurm.conf
}

# pid_alive PIDFILE NAME: true if PIDFILE names a live process whose command name is NAME (so a
# stale pid file whose pid was reused by another program is never trusted).
pid_alive() {
  local pid comm
  [[ -r $1 ]] || return 1
  pid=$(tr -dc '0-9' <"$1")
  [[ -n $pid ]] || return 1
  comm=$(cat "/proc/$pid/comm" 2>/dev/null) || return 1
  [[ $comm == "$2" ]]
}

# Daemon pid files with the command name each must have: slurmds, slurmctld, munged (stop order).
daemon_pidfiles() {
  local f
  for f in "$DIR"/run/slurmd-*.pid; do [[ -e $f ]] && echo "$f slurmd"; done
  echo "$DIR/run/slurmctld.pid slurmctld"
  echo "$DIR/run/munged.pid munged"
}

any_daemon_alive() {
  local f name
  while read -r f name; do pid_alive "$f" "$name" && return 0; done < <(daemon_pidfiles)
  return 1
}

log_tails() {
  local f
  for f in "$DIR"/log/*; do
    [[ -s $f ]] || continue
    echo "--- tail of $f" >&2
    tail -n 20 "$f" >&2
  done
}

# free_ports N: N consecutive free TCP ports on 127.0.0.1, below the kernel's ephemeral range (why:
# free_ports.py).
free_ports() {
  python3 "$(dirname "${BASH_SOURCE[0]}")/free_ports.py" "$1"
}

# --- start --------------------------------------------------------------------------------------

write_conf() {
  local ctld_port=$1 host=$2; shift 2
  local node_ports=("$@") i cpus=$((NODES == 1 ? 2 : 1)) names=()
  {
    cat <<EOF
# Generated by cluster/slurm-local.sh start --nodes $NODES --dir $DIR
ClusterName=distrain-local
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$ctld_port
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# socket: this cluster's own munged (read by the daemons and by every client command).
# cred_expire: also how long a requeued job is held before it may run again (default 120 s).
AuthInfo=socket=$DIR/munge/munge.socket.2,cred_expire=10
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool/%n
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd-%n.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
# A requeued job's BeginTime passing is no scheduling event: slurmctld notices it only after a
# full-queue pass of the main scheduler (every sched_interval, default 60 s). Every second here.
SchedulerParameters=sched_interval=1,bf_interval=1
MpiDefault=none
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
ReturnToService=2
JobRequeue=1
# Test-friendly timing (see the header of cluster/slurm-local.sh).
MinJobAge=4
KillWait=5
MessageTimeout=20
SlurmctldTimeout=60
SlurmdTimeout=60
InactiveLimit=0
Waittime=0
MailProg=/bin/true
EOF
    for i in $(seq 1 "$NODES"); do
      names+=("n$i")
      echo "NodeName=n$i NodeHostname=$host NodeAddr=127.0.0.1 Port=${node_ports[$((i - 1))]} CPUs=$cpus State=UNKNOWN"
    done
    local IFS=,
    echo "PartitionName=debug Nodes=${names[*]} Default=YES MaxTime=INFINITE State=UP"
  } >"$CONF"
}

# wait_for TIMEOUT DESCRIPTION COMMAND...: poll COMMAND every 0.2 s until it succeeds.
wait_for() {
  local timeout=$1 what=$2 deadline; shift 2
  deadline=$((SECONDS + timeout))
  until "$@"; do
    if ((SECONDS >= deadline)); then
      echo "$SCRIPT_NAME: timed out after ${timeout}s waiting for $what" >&2
      return 1
    fi
    sleep 0.2
  done
}

munge_ok() { munge -n -S "$DIR/munge/munge.socket.2" 2>/dev/null | unmunge -S "$DIR/munge/munge.socket.2" >/dev/null 2>&1; }

nodes_idle() {
  local states
  states=$(SLURM_CONF=$CONF sinfo -h -N -o '%t' 2>/dev/null) || return 1
  [[ $(grep -cx 'idle' <<<"$states") -eq $NODES ]]
}

start_failed() {
  echo "$SCRIPT_NAME: start failed in $DIR" >&2
  log_tails
  cmd_stop_dir >/dev/null 2>&1 || true
  exit 1
}

cmd_start() {
  ALLOW_NODES=1 parse_opts "$@"
  local c host ports i
  for c in munged munge unmunge slurmctld slurmd sinfo python3; do
    command -v "$c" >/dev/null || die "$c not found; run: $SCRIPT_NAME install"
  done
  [[ $(id -u) -eq 0 ]] || die "start needs root (the daemons run as SlurmUser=root)"
  ((${#DIR} <= MAX_DIR_LEN)) || die "--dir is ${#DIR} characters long; use at most $MAX_DIR_LEN (unix socket paths inside it are limited to 107)"
  if any_daemon_alive; then
    die "already running in $DIR (stop it first: $SCRIPT_NAME stop --dir $DIR)"
  fi
  host=$(hostname -s)

  mkdir -p "$DIR"/{munge,run,log,state}
  # Clients of any user must reach the socket in there; only the key itself is private.
  chmod 0755 "$DIR" "$DIR/munge"
  rm -rf "$DIR/spool"
  for i in $(seq 1 "$NODES"); do mkdir -p "$DIR/spool/n$i"; done
  rm -f "$DIR"/run/*.pid "$DIR"/munge/munge.socket.2*
  # Fresh logs per start so a failure shows this start's messages only.
  rm -f "$DIR"/log/*

  # A private key per cluster. --force: munged otherwise refuses to run with its files under /tmp
  # (world-writable parent directories) and as root.
  (umask 077 && dd if=/dev/urandom of="$DIR/munge/munge.key" bs=1024 count=1 status=none)
  munged --force -S "$DIR/munge/munge.socket.2" --key-file "$DIR/munge/munge.key" \
    --pid-file "$DIR/run/munged.pid" --log-file "$DIR/log/munged.log" \
    --seed-file "$DIR/munge/munged.seed" </dev/null >>"$DIR/log/daemons.out" 2>&1 || start_failed
  wait_for 10 "munged" munge_ok || start_failed

  read -r -a ports <<<"$(free_ports $((NODES + 1)))"
  write_conf "${ports[0]}" "$host" "${ports[@]:1}"

  # Both daemons fork into the background themselves and write the pid files named in slurm.conf.
  # Their stdio goes to a file so a caller that captures our output is not kept waiting on a pipe.
  SLURM_CONF=$CONF slurmctld -c -f "$CONF" </dev/null >>"$DIR/log/daemons.out" 2>&1 || start_failed
  for i in $(seq 1 "$NODES"); do
    SLURM_CONF=$CONF slurmd -f "$CONF" -N "n$i" </dev/null >>"$DIR/log/daemons.out" 2>&1 || start_failed
  done
  wait_for "$START_TIMEOUT" "$NODES idle node(s)" nodes_idle || start_failed
  echo "SLURM running in $DIR with $NODES node(s); use: eval \"\$($0 env --dir $DIR)\""
}

# --- stop ---------------------------------------------------------------------------------------

# Cancel this cluster's jobs so their slurmstepd/job processes (which outlive slurmd) end too.
cancel_jobs() {
  local jobs
  pid_alive "$DIR/run/slurmctld.pid" slurmctld || return 0
  jobs=$(SLURM_CONF=$CONF squeue -h -o '%A' 2>/dev/null) || return 0
  [[ -n $jobs ]] || return 0
  # shellcheck disable=SC2086 # one job id per word
  SLURM_CONF=$CONF scancel $jobs 2>/dev/null || true
  wait_for $STOP_TIMEOUT "the cancelled jobs to end" jobs_gone || true
}

# True when no job of this cluster is pending, running, suspended or completing.
jobs_gone() {
  local states
  states=$(SLURM_CONF=$CONF squeue -h -t PD,CF,R,S,CG -o '%A' 2>/dev/null) || return 0
  [[ -z $states ]]
}

# stop_daemons PIDFILE NAME [PIDFILE NAME ...]: SIGTERM each live daemon, wait for all of them to
# exit (each takes ~2 s), SIGKILL any that is still there after STOP_TIMEOUT seconds.
stop_daemons() {
  local pids=() names=() pid i deadline left
  while [[ $# -ge 2 ]]; do
    if pid_alive "$1" "$2"; then
      pid=$(tr -dc '0-9' <"$1")
      kill -TERM "$pid" 2>/dev/null && { pids+=("$pid"); names+=("$2"); }
    fi
    shift 2
  done
  deadline=$((SECONDS + STOP_TIMEOUT))
  while :; do
    left=0
    for i in "${!pids[@]}"; do
      [[ $(cat "/proc/${pids[$i]}/comm" 2>/dev/null) == "${names[$i]}" ]] && left=1
    done
    ((left)) || return 0
    if ((SECONDS >= deadline)); then
      for i in "${!pids[@]}"; do
        if [[ $(cat "/proc/${pids[$i]}/comm" 2>/dev/null) == "${names[$i]}" ]]; then
          echo "$SCRIPT_NAME: ${names[$i]} (pid ${pids[$i]}) ignored SIGTERM for ${STOP_TIMEOUT}s; sending SIGKILL" >&2
          kill -KILL "${pids[$i]}" 2>/dev/null || true
        fi
      done
      sleep 0.5
      return 0
    fi
    sleep 0.1
  done
}

cmd_stop_dir() {
  local f name slurm_daemons=()
  [[ -d $DIR ]] || return 0
  cancel_jobs
  while read -r f name; do
    [[ $name == munged ]] || slurm_daemons+=("$f" "$name")
  done < <(daemon_pidfiles)
  # The slurm daemons together, munged last: they may still authenticate while shutting down.
  stop_daemons "${slurm_daemons[@]}"
  stop_daemons "$DIR/run/munged.pid" munged
  find "$DIR" -type s -delete 2>/dev/null || true
}

cmd_stop() {
  parse_opts "$@"
  cmd_stop_dir
}

# --- env / status -------------------------------------------------------------------------------

cmd_env() {
  parse_opts "$@"
  [[ -f $CONF ]] || die "no $CONF; run: $SCRIPT_NAME start --dir $DIR"
  printf 'export SLURM_CONF=%q\n' "$CONF"
  printf 'export DISTRAIN_SLURM_DIR=%q\n' "$DIR"
}

cmd_status() {
  parse_opts "$@"
  if pid_alive "$DIR/run/slurmctld.pid" slurmctld; then
    SLURM_CONF=$CONF sinfo
  else
    echo "not running"
    exit 3
  fi
}

main() {
  [[ $# -ge 1 ]] || usage
  local cmd=$1; shift
  case $cmd in
    install) cmd_install "$@" ;;
    start) cmd_start "$@" ;;
    stop) cmd_stop "$@" ;;
    status) cmd_status "$@" ;;
    env) cmd_env "$@" ;;
    -h|--help|help) help ;;
    *) echo "$SCRIPT_NAME: unknown command: $cmd" >&2; usage ;;
  esac
}

main "$@"
