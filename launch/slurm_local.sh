#!/usr/bin/env bash
# A one-node SLURM cluster on this machine, for testing the cluster=slurm path (docs/SLURM.md).
#   sudo launch/slurm_local.sh         install (if missing), configure, start; verify when already up
#   sudo launch/slurm_local.sh stop    stop slurmd, slurmctld and munged
# Root on Debian/Ubuntu (apt-get). No systemd needed: the daemons are started directly.
# The node has CPUs = nproc (at least 2, so a 2-task job fits) and RealMemory a bit under the
# machine's; partition `debug` is the default. Logs: /var/log/slurm/.
set -euo pipefail

CONF=/etc/slurm/slurm.conf
MARK="# written by dllm_rl launch/slurm_local.sh"
CTLD_PID=/run/slurmctld.pid
SLURMD_PID=/run/slurmd.pid
MUNGE_PID=/run/munge/munged.pid

say() { echo "slurm_local: $*"; }
die() { echo "slurm_local: error: $*" >&2; exit 1; }
alive() { [[ -f "$1" ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

stop_daemon() {  # pid file, name
    if alive "$1"; then
        kill "$(cat "$1")"
        for _ in $(seq 50); do alive "$1" || break; sleep 0.2; done
        say "stopped $2"
    fi
    rm -f "$1"
}

if [[ "${1:-}" == stop ]]; then
    stop_daemon "$SLURMD_PID" slurmd
    stop_daemon "$CTLD_PID" slurmctld
    stop_daemon "$MUNGE_PID" munged
    exit 0
fi
[[ $# -eq 0 ]] || die "usage: $0 [stop]"
[[ $EUID -eq 0 ]] || die "run as root (installs packages and starts system daemons)"

# --- packages
missing=()
for pkg in munge slurmctld slurmd slurm-client; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if ((${#missing[@]})); then
    say "installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# --- munge: key (munge user, 0400) and daemon
key=/etc/munge/munge.key
if [[ ! -s $key ]]; then
    dd if=/dev/urandom of=$key bs=1 count=1024 status=none
    say "created $key"
fi
chown munge:munge $key
chmod 0400 $key
install -d -o munge -g munge -m 0755 /run/munge
install -d -o munge -g munge -m 0700 /var/lib/munge /var/log/munge
if ! alive "$MUNGE_PID"; then
    runuser -u munge -- /usr/sbin/munged --pid-file="$MUNGE_PID"
    say "started munged"
fi
munge -n | unmunge >/dev/null || die "munge credentials do not round-trip"

# --- slurm.conf
host=$(hostname -s)
cpus=$(nproc)
((cpus >= 2)) || cpus=2  # SlurmdParameters=config_overrides lets a 1-core machine still run 2 tasks
mem_mb=$(awk '/MemTotal/ {print int($2 / 1024)}' /proc/meminfo)
real_mb=$((mem_mb * 95 / 100))
conf="$MARK
ClusterName=local
SlurmctldHost=$host
SlurmUser=root
SlurmctldPort=6817
SlurmdPort=6818
AuthType=auth/munge
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=$CTLD_PID
SlurmdPidFile=$SLURMD_PID
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
# requeue after a timeout or preemption (submitit's checkpoint hook calls scontrol requeue)
JobRequeue=1
ReturnToService=2
SlurmdParameters=config_overrides
# finished jobs leave squeue/scontrol after 5 minutes
MinJobAge=300
NodeName=$host CPUs=$cpus RealMemory=$real_mb State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=24:00:00 DefaultTime=01:00:00 State=UP"

if [[ -f $CONF ]] && ! head -1 "$CONF" | grep -qF "$MARK"; then
    die "$CONF exists and was not written by this script; not touching it"
fi
changed=0
if [[ ! -f $CONF ]] || [[ "$(cat "$CONF")" != "$conf" ]]; then
    install -d /etc/slurm
    printf '%s\n' "$conf" >"$CONF"
    changed=1
    say "wrote $CONF (node $host: CPUs=$cpus RealMemory=${real_mb}M, partition debug)"
fi
install -d /var/spool/slurmctld /var/spool/slurmd /var/log/slurm

# --- daemons
if ((changed)); then
    stop_daemon "$SLURMD_PID" slurmd
    stop_daemon "$CTLD_PID" slurmctld
fi
if ! alive "$CTLD_PID"; then
    slurmctld
    say "started slurmctld"
fi
if ! alive "$SLURMD_PID"; then
    slurmd
    say "started slurmd"
fi

# --- wait for the node
state=""
for _ in $(seq 60); do
    state=$(sinfo -h -N -n "$host" -o %t 2>/dev/null | head -1 || true)
    case "$state" in
        idle | mix | alloc | comp) break ;;
        drain | drng | down | down\* | fail | inval)
            scontrol update NodeName="$host" State=RESUME 2>/dev/null || true ;;
    esac
    sleep 1
done
case "$state" in
    idle | mix | alloc | comp) ;;
    *) die "node $host is '${state:-not listed}' after 60 s; see /var/log/slurm/slurmd.log and slurmctld.log" ;;
esac
say "up: node $host is $state in partition debug ($(sinfo -V))"
