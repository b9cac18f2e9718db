#!/bin/bash
# Start/stop a one-node Slurm cluster (slurmctld + slurmd + munge) for the `slurm` tests.
#   tests/slurm/cluster.sh start [STATE_DIR]   idempotent; installs Slurm with apt-get if missing
#   tests/slurm/cluster.sh stop  [STATE_DIR]   stops only the daemons this script started (pid files)
#   tests/slurm/cluster.sh status [STATE_DIR]
# Needs root (daemons run as SlurmUser=root) and Debian/Ubuntu apt for the install.
# Exit codes: 0 ok; 3 cannot run here (not root / no apt-get / install failed); 1 other failure.
set -euo pipefail
cmd=${1:-start}
STATE=${2:-${MPITRAIN_SLURM_STATE:-/tmp/mpitrain-slurm}}
HOST=$(hostname -s)
CPUS=${MPITRAIN_SLURM_CPUS:-8}   # advertised CPUs (more task slots than cores is fine for tests)

pid_alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

install() {
    command -v slurmctld >/dev/null && command -v munged >/dev/null && command -v srun >/dev/null \
        && ls /usr/lib/*/libpmix.so >/dev/null 2>&1 && return 0
    [ "$(id -u)" = 0 ] || { echo "cluster.sh: not root" >&2; exit 3; }
    command -v apt-get >/dev/null || { echo "cluster.sh: no apt-get" >&2; exit 3; }
    export DEBIAN_FRONTEND=noninteractive
    if ! apt-get install -y -q --no-install-recommends slurmctld slurmd slurm-client munge libpmix-dev \
            >"$STATE/apt.log" 2>&1; then
        apt-get update -q >>"$STATE/apt.log" 2>&1 || true
        apt-get install -y -q --no-install-recommends slurmctld slurmd slurm-client munge libpmix-dev \
            >>"$STATE/apt.log" 2>&1 || { echo "cluster.sh: apt-get install failed, see $STATE/apt.log" >&2; exit 3; }
    fi
}

start() {
    [ "$(id -u)" = 0 ] || { echo "cluster.sh: not root" >&2; exit 3; }
    mkdir -p "$STATE"/{spool,ctld,log}
    install
    if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
        [ -f /etc/munge/munge.key ] || { /usr/sbin/mungekey -c 2>/dev/null || /usr/sbin/create-munge-key -f; }
        mkdir -p /run/munge /var/log/munge /var/lib/munge
        chown munge: /run/munge /var/log/munge /var/lib/munge /etc/munge/munge.key 2>/dev/null || true
        runuser -u munge -- /usr/sbin/munged
        echo started >"$STATE/munge.started"
        for _ in $(seq 50); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.1; done
    fi
    mem=$(awk '/MemTotal/ {print int($2/1024*0.8)}' /proc/meminfo)
    cat >"$STATE/slurm.conf" <<CONF
ClusterName=mpitrain
SlurmctldHost=$HOST(127.0.0.1)
SlurmUser=root
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=pmi2
MailProg=/bin/true
ReturnToService=2
SlurmdParameters=config_overrides
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/spool
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.log
SlurmctldPort=6817
SlurmdPort=6818
JobRequeue=1
KillWait=5
MinJobAge=600
SchedulerType=sched/backfill
NodeName=$HOST NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
CONF
    mkdir -p /etc/slurm
    if [ -e /etc/slurm/slurm.conf ] && [ ! -L /etc/slurm/slurm.conf ] && ! cmp -s /etc/slurm/slurm.conf "$STATE/slurm.conf"; then
        cp /etc/slurm/slurm.conf "$STATE/slurm.conf.orig"
    fi
    ln -sf "$STATE/slurm.conf" /etc/slurm/slurm.conf
    pid_alive "$STATE/slurmctld.pid" || /usr/sbin/slurmctld
    pid_alive "$STATE/slurmd.pid" || /usr/sbin/slurmd -N "$HOST"
    for _ in $(seq 100); do
        state=$(sinfo -h -n "$HOST" -o %T 2>/dev/null || true)
        case $state in idle|mixed|allocated) echo "cluster.sh: node $HOST $state"; return 0;; esac
        case $state in down*|drain*) scontrol update NodeName="$HOST" State=RESUME 2>/dev/null || true;; esac
        sleep 0.2
    done
    echo "cluster.sh: node did not become idle (state '${state:-}'); logs in $STATE/log" >&2
    exit 1
}

stop() {
    for d in slurmd slurmctld; do
        if pid_alive "$STATE/$d.pid"; then kill "$(cat "$STATE/$d.pid")"; fi
    done
    for _ in $(seq 50); do
        pid_alive "$STATE/slurmd.pid" || pid_alive "$STATE/slurmctld.pid" || break; sleep 0.1
    done
    if [ -f "$STATE/munge.started" ] && [ -f /run/munge/munged.pid ]; then
        kill "$(cat /run/munge/munged.pid)" 2>/dev/null || true
        rm -f "$STATE/munge.started"
    fi
    if [ -L /etc/slurm/slurm.conf ] && [ "$(readlink /etc/slurm/slurm.conf)" = "$STATE/slurm.conf" ]; then
        rm -f /etc/slurm/slurm.conf
        [ -f "$STATE/slurm.conf.orig" ] && cp "$STATE/slurm.conf.orig" /etc/slurm/slurm.conf
    fi
    echo "cluster.sh: stopped"
}

case $cmd in
    start) start ;;
    stop) stop ;;
    status) sinfo ;;
    *) echo "usage: $0 start|stop|status [STATE_DIR]" >&2; exit 2 ;;
esac
