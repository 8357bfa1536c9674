#!/usr/bin/env bash
# A real single-node SLURM cluster on this Debian machine, for glowlab's tests and for trying the
# sbatch scripts without a site cluster. No systemd is needed: munged, slurmctld and slurmd are
# started directly, with their configuration, state and logs in one folder, and `stop` ends only
# the daemons this script started (their PIDs are recorded there).
#
#   slurm/local-cluster.sh install   # apt-get install slurmctld slurmd slurm-client munge (root)
#   slurm/local-cluster.sh start     # then: export SLURM_CONF=$GLOWLAB_SLURM_DIR/slurm.conf
#   slurm/local-cluster.sh status
#   slurm/local-cluster.sh stop
#
# GLOWLAB_SLURM_DIR (default /tmp/glowlab-slurm) holds slurm.conf, state, spool, logs and PIDs.
set -euo pipefail

dir="${GLOWLAB_SLURM_DIR:-/tmp/glowlab-slurm}"
conf="$dir/slurm.conf"
export SLURM_CONF="$conf"

need() { command -v "$1" >/dev/null 2>&1 || { echo "local-cluster: $1 not found; run '$0 install' (needs root)" >&2; exit 1; }; }

install_packages() {
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq slurmctld slurmd slurm-client munge >/dev/null
}

write_config() {
  local host cpus mem
  host="$(hostname -s)"
  # Not `nproc`: it follows OMP_NUM_THREADS, which would shrink the node to what one process may use.
  cpus="$(getconf _NPROCESSORS_ONLN)"
  mem="$(awk '/MemTotal/ {print int($2 / 1024 * 0.9)}' /proc/meminfo)"
  mkdir -p "$dir/state" "$dir/spool" "$dir/log"
  cat > "$conf" <<CONF
ClusterName=glowlab-local
SlurmctldHost=$host
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
SlurmctldPort=${GLOWLAB_SLURMCTLD_PORT:-6817}
SlurmdPort=${GLOWLAB_SLURMD_PORT:-6818}
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
JobRequeue=1
MinJobAge=600
KillWait=30
SlurmctldTimeout=30
SlurmdTimeout=30
MpiDefault=none
NodeName=$host CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
CONF
}

start_munge() {
  if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    return  # a munged is already serving this machine
  fi
  mkdir -p /run/munge /var/log/munge /var/lib/munge
  chown munge:munge /run/munge /var/log/munge /var/lib/munge
  [ -f /etc/munge/munge.key ] || { mungekey --create --keyfile /etc/munge/munge.key; chown munge:munge /etc/munge/munge.key; chmod 400 /etc/munge/munge.key; }
  runuser -u munge -- /usr/sbin/munged
  pgrep -u munge -x munged | head -n 1 > "$dir/munged.started"
}

wait_for() {  # wait_for SECONDS CMD...: retry until CMD succeeds
  local deadline=$((SECONDS + $1)); shift
  until "$@" >/dev/null 2>&1; do
    [ "$SECONDS" -lt "$deadline" ] || return 1
    sleep 0.5
  done
}

start() {
  need slurmctld; need slurmd; need munged
  mkdir -p "$dir"
  if [ -f "$dir/slurmctld.pid" ] && kill -0 "$(cat "$dir/slurmctld.pid")" 2>/dev/null; then
    echo "local-cluster: already running (SLURM_CONF=$conf)"
    return
  fi
  write_config
  start_munge
  /usr/sbin/slurmctld -f "$conf"
  wait_for 20 scontrol ping || { echo "local-cluster: slurmctld did not start; see $dir/log/slurmctld.log" >&2; exit 1; }
  /usr/sbin/slurmd -f "$conf"
  wait_for 30 bash -c "sinfo -h -N -o '%T' | grep -Eq '^(idle|mixed|allocated)'" || {
    echo "local-cluster: slurmd did not register; see $dir/log/slurmd.log" >&2; exit 1; }
  echo "local-cluster: up; export SLURM_CONF=$conf"
  sinfo
}

stop() {
  local name pid
  for name in slurmd slurmctld; do
    if [ -f "$dir/$name.pid" ]; then
      pid="$(cat "$dir/$name.pid")"
      kill "$pid" 2>/dev/null || true
      for _ in $(seq 40); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
      rm -f "$dir/$name.pid"
    fi
  done
  if [ -f "$dir/munged.started" ]; then
    pid="$(cat "$dir/munged.started")"
    [ -n "$pid" ] && kill "$pid" 2>/dev/null || true
    rm -f "$dir/munged.started"
  fi
  echo "local-cluster: stopped what it started"
}

case "${1:-}" in
  install) install_packages ;;
  start) start ;;
  stop) stop ;;
  status) scontrol ping && sinfo ;;
  *) echo "usage: $0 install|start|stop|status" >&2; exit 2 ;;
esac
