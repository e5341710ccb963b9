#!/usr/bin/env bash
# A SLURM cluster on this machine, for testing the cluster=slurm path (docs/SLURM.md).
#   sudo launch/slurm_local.sh                   install (if missing), configure, start; verify when already up
#   sudo launch/slurm_local.sh stop              stop slurmd, slurmctld and munged
#   sudo launch/slurm_local.sh --nodes 2 [stop]  a second, separate cluster of two nodes on this machine
# Root on Debian/Ubuntu (apt-get). No systemd needed: the daemons are started directly.
# One node: CPUs = nproc (at least 2, so a 2-task job fits) and RealMemory a bit under the machine's;
# partition `debug` is the default; /etc/slurm/slurm.conf. Logs: /var/log/slurm/.
# Two nodes: two slurmd daemons on this host (`slurmd -N <name>`, each on its own Port=), named dllm0 and
# dllm1 with NodeAddr 127.0.0.1, half the cores each (at least 1), partition `two`; its own config
# (/etc/slurm/two_nodes/slurm.conf: clients need SLURM_CONF set to it), ports, state and pid files, so it
# runs beside the one-node cluster. The two nodes share this machine's munge daemon.
set -euo pipefail

nodes=1
action=start
while (($#)); do
    case "$1" in
        stop) action=stop ;;
        --nodes) nodes="${2:-}"; shift ;;
        *) echo "usage: $0 [--nodes 1|2] [stop]" >&2; exit 2 ;;
    esac
    shift
done

MARK="# written by dllm_rl launch/slurm_local.sh"
MUNGE_PID=/run/munge/munged.pid
if [[ "$nodes" == 1 ]]; then
    CONF=/etc/slurm/slurm.conf
    CTLD_PID=/run/slurmctld.pid
    NODE_NAMES=("$(hostname -s)")
    SLURMD_PIDS=(/run/slurmd.pid)
    PARTITION=debug
elif [[ "$nodes" == 2 ]]; then
    CONF=/etc/slurm/two_nodes/slurm.conf
    CTLD_PID=/run/slurmctld-two-nodes.pid
    NODE_NAMES=(dllm0 dllm1)
    SLURMD_PIDS=(/run/slurmd-two-nodes-dllm0.pid /run/slurmd-two-nodes-dllm1.pid)
    PARTITION=two
else
    echo "slurm_local: error: --nodes must be 1 or 2" >&2
    exit 2
fi

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

stop_slurm() {
    for i in "${!NODE_NAMES[@]}"; do stop_daemon "${SLURMD_PIDS[$i]}" "slurmd ${NODE_NAMES[$i]}"; done
    stop_daemon "$CTLD_PID" slurmctld
}

if [[ "$action" == stop ]]; then
    stop_slurm
    # munged serves both clusters: the one-node cluster's stop ends it
    [[ "$nodes" == 1 ]] && stop_daemon "$MUNGE_PID" munged
    exit 0
fi
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
mem_mb=$(awk '/MemTotal/ {print int($2 / 1024)}' /proc/meminfo)
real_mb=$((mem_mb * 95 / 100))
if [[ "$nodes" == 1 ]]; then
    ((cpus >= 2)) || cpus=2  # SlurmdParameters=config_overrides lets a 1-core machine still run 2 tasks
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
SlurmdPidFile=${SLURMD_PIDS[0]}
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log"
    node_lines="NodeName=$host CPUs=$cpus RealMemory=$real_mb State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=24:00:00 DefaultTime=01:00:00 State=UP"
    spool_dirs=(/var/spool/slurmctld /var/spool/slurmd)
else
    half=$((cpus / 2)); ((half >= 1)) || half=1
    conf="$MARK
ClusterName=local2
SlurmctldHost=$host
SlurmUser=root
SlurmctldPort=6917
SlurmdPort=6918
AuthType=auth/munge
StateSaveLocation=/var/spool/slurmctld-two-nodes
SlurmdSpoolDir=/var/spool/slurmd-two-nodes/%n
SlurmctldPidFile=$CTLD_PID
SlurmdPidFile=/run/slurmd-two-nodes-%n.pid
SlurmctldLogFile=/var/log/slurm/slurmctld-two-nodes.log
SlurmdLogFile=/var/log/slurm/slurmd-two-nodes-%n.log"
    # both daemons run on this host: each node its own port, and node names that are no host names
    node_lines="NodeName=dllm0 NodeHostname=$host NodeAddr=127.0.0.1 Port=6921 CPUs=$half RealMemory=$((real_mb / 2)) State=UNKNOWN
NodeName=dllm1 NodeHostname=$host NodeAddr=127.0.0.1 Port=6922 CPUs=$half RealMemory=$((real_mb / 2)) State=UNKNOWN
PartitionName=two Nodes=dllm[0-1] Default=YES MaxTime=24:00:00 DefaultTime=01:00:00 State=UP"
    spool_dirs=(/var/spool/slurmctld-two-nodes /var/spool/slurmd-two-nodes/dllm0 /var/spool/slurmd-two-nodes/dllm1)
fi
conf="$conf
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
$node_lines"

if [[ -f $CONF ]] && ! head -1 "$CONF" | grep -qF "$MARK"; then
    die "$CONF exists and was not written by this script; not touching it"
fi
changed=0
if [[ ! -f $CONF ]] || [[ "$(cat "$CONF")" != "$conf" ]]; then
    install -d "$(dirname "$CONF")"
    printf '%s\n' "$conf" >"$CONF"
    changed=1
    say "wrote $CONF (nodes ${NODE_NAMES[*]}, partition $PARTITION)"
fi
install -d "${spool_dirs[@]}" /var/log/slurm
export SLURM_CONF=$CONF

# --- daemons
if ((changed)); then
    stop_slurm
fi
if ! alive "$CTLD_PID"; then
    slurmctld -f "$CONF"
    say "started slurmctld"
fi
for i in "${!NODE_NAMES[@]}"; do
    if ! alive "${SLURMD_PIDS[$i]}"; then
        if [[ "$nodes" == 1 ]]; then slurmd -f "$CONF"; else slurmd -f "$CONF" -N "${NODE_NAMES[$i]}"; fi
        say "started slurmd ${NODE_NAMES[$i]}"
    fi
done

# --- wait for the nodes
for name in "${NODE_NAMES[@]}"; do
    state=""
    for _ in $(seq 60); do
        state=$(sinfo -h -N -n "$name" -o %t 2>/dev/null | head -1 || true)
        case "$state" in
            idle | mix | alloc | comp) break ;;
            drain | drng | down | down\* | fail | inval)
                scontrol update NodeName="$name" State=RESUME 2>/dev/null || true ;;
        esac
        sleep 1
    done
    case "$state" in
        idle | mix | alloc | comp) ;;
        *) die "node $name is '${state:-not listed}' after 60 s; see the slurmd and slurmctld logs in /var/log/slurm/" ;;
    esac
done
say "up: nodes ${NODE_NAMES[*]} in partition $PARTITION ($(sinfo -V)); SLURM_CONF=$CONF"
