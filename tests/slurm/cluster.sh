#!/usr/bin/env bash
# A private single-node Slurm cluster for the SLURM end-to-end test (tests/test_slurm.py).
#
#   tests/slurm/cluster.sh start [DIR]    configure and start munged, slurmctld and slurmd
#   tests/slurm/cluster.sh env [DIR]      print the exports that point Slurm commands at it
#   tests/slurm/cluster.sh status [DIR]   sinfo and squeue of the private cluster
#   tests/slurm/cluster.sh stop [DIR]     cancel its jobs and stop its daemons (by PID)
#
# DIR (default $CGFLOW_SLURM_DIR, else /tmp/cgflow-slurm) holds everything: slurm.conf and
# gres.conf, the munge key and socket, state, spool, logs and PID files. Nothing under /etc,
# /run or /var is written, so a system Slurm or munge on the same machine is left alone.
#
# Needs root (slurmd runs the jobs as the submitting user) and the Debian packages
#   apt-get install -y --no-install-recommends slurmctld slurmd slurm-client munge
#
# The node offers every core of the machine, a share of its memory and two fake GPUs: gres
# `gpu` backed by two existing character devices (/dev/tty0, /dev/tty1, or private device
# nodes), so `sbatch --gpus=1` schedules and the job sees CUDA_VISIBLE_DEVICES. Two partitions,
# `cpu` (default) and `gpu`, share the node; they match the placeholders of profiles/slurm.
# There is no slurmdbd: use `squeue` for job status (MinJobAge keeps finished jobs listed).
#
# Environment: CGFLOW_SLURM_PORT (slurmctld port; slurmd uses the next one; default: the first
# free pair from 16817), CGFLOW_SLURM_TIMEOUT (seconds to wait for the node, default 180).
set -euo pipefail

cmd=${1:-}
DIR=${2:-${CGFLOW_SLURM_DIR:-/tmp/cgflow-slurm}}
TIMEOUT=${CGFLOW_SLURM_TIMEOUT:-180}

die() {
    echo "cluster.sh: $*" >&2
    exit 1
}

usage() {
    sed -n '2,7p' "$0" | sed 's/^# \{0,1\}//' >&2
    exit 2
}

[[ -n $cmd ]] || usage
mkdir -p "$DIR" 2>/dev/null || true
[[ -d $DIR ]] || die "cannot create $DIR"
DIR=$(cd "$DIR" && pwd)
CONF=$DIR/etc/slurm.conf
SOCKET=$DIR/munge/munge.socket
NODE=$(hostname -s)

slurm() { SLURM_CONF=$CONF "$@"; }

# PID from a pid file, only if that process is still the daemon named $2 (no stale PIDs).
live_pid() {
    local file=$1 name=$2 pid
    [[ -s $file ]] || return 1
    pid=$(tr -dc '0-9' <"$file")
    [[ -n $pid && -r /proc/$pid/comm ]] || return 1
    [[ $(cat "/proc/$pid/comm") == "$name" ]] || return 1
    echo "$pid"
}

port_in_use() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

node_state() { slurm sinfo --noheader --nodes="$NODE" --format=%T 2>/dev/null | head -n1; }

print_logs() {
    local f
    for f in "$DIR"/log/*.log; do
        [[ -f $f ]] || continue
        echo "---- $f (last 30 lines)" >&2
        tail -n 30 "$f" >&2
    done
}

write_config() {
    local ctld_port=$1 slurmd_port=$2 cpus mem_mb dev0 dev1
    cpus=$(nproc)
    # offer 80 % of the physical memory (slurmd drains a node that reports less than configured)
    mem_mb=$(awk '/^MemTotal:/ {printf "%d", $2 / 1024 * 0.8}' /proc/meminfo)
    if [[ -c /dev/tty0 && -c /dev/tty1 ]]; then
        dev0=/dev/tty0
        dev1=/dev/tty1
    else
        # any character device serves as a fake GPU: slurmd only stats it
        mkdir -p "$DIR/dev"
        for i in 0 1; do
            [[ -c $DIR/dev/gpu$i ]] || mknod -m 600 "$DIR/dev/gpu$i" c 1 3
        done
        dev0=$DIR/dev/gpu0
        dev1=$DIR/dev/gpu1
    fi
    cat >"$CONF" <<EOF
# Private single-node test cluster written by tests/slurm/cluster.sh; do not edit.
ClusterName=cgflowtest
SlurmctldHost=$NODE(127.0.0.1)
SlurmctldPort=$ctld_port
SlurmdPort=$slurmd_port
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$SOCKET
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool/slurmd
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
# no cgroups: processes are tracked by parent PID and tasks are not confined
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SwitchType=switch/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
# a node that was down comes back as soon as its slurmd registers with a valid configuration
ReturnToService=2
# finished jobs stay visible to squeue and scontrol for an hour (Snakemake's status queries
# need a few minutes; the test inspects every job of the campaign after it has finished)
MinJobAge=3600
SchedulerParameters=batch_sched_delay=1
InactiveLimit=0
KillWait=5
Waittime=0
GresTypes=gpu
NodeName=$NODE NodeAddr=127.0.0.1 NodeHostname=$NODE CPUs=$cpus RealMemory=$mem_mb Gres=gpu:2 State=UNKNOWN
PartitionName=cpu Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
PartitionName=gpu Nodes=$NODE Default=NO MaxTime=INFINITE State=UP
EOF
    cat >"$DIR/etc/gres.conf" <<EOF
# Two fake GPUs (character devices that exist on every Linux machine); a count without
# File= makes slurmd report fewer GPUs than configured and the node drains.
NodeName=$NODE Name=gpu File=$dev0
NodeName=$NODE Name=gpu File=$dev1
EOF
    # srun inside a job runs with the SLURM_* variables of the job removed (the Snakemake
    # jobstep executor does this), SLURM_CONF included; this wrapper restores the private config
    mkdir -p "$DIR/bin"
    local tool
    for tool in srun sbatch squeue scancel sinfo scontrol sacct; do
        cat >"$DIR/bin/$tool" <<EOF
#!/bin/sh
SLURM_CONF=$CONF exec /usr/bin/$tool "\$@"
EOF
        chmod 755 "$DIR/bin/$tool"
    done
}

start_munge() {
    mkdir -p "$DIR/munge"
    chmod 700 "$DIR/munge"
    if ! live_pid "$DIR/munge/munged.pid" munged >/dev/null; then
        [[ -s $DIR/munge/munge.key ]] || mungekey --create --keyfile="$DIR/munge/munge.key"
        chmod 600 "$DIR/munge/munge.key"
        # --force: munged runs as root here (the private key and socket belong to root)
        munged --force --socket="$SOCKET" --pid-file="$DIR/munge/munged.pid" \
            --key-file="$DIR/munge/munge.key" --log-file="$DIR/log/munged.log" \
            --seed-file="$DIR/munge/munged.seed"
    fi
    local i
    for ((i = 0; i < 50; i++)); do
        if munge --socket="$SOCKET" --no-input 2>/dev/null | unmunge --socket="$SOCKET" >/dev/null 2>&1; then
            return 0
        fi
        sleep 0.2
    done
    print_logs
    die "munged does not answer on $SOCKET"
}

start() {
    [[ $(id -u) -eq 0 ]] || die "must run as root (slurmd starts jobs as the submitting user)"
    local exe
    for exe in slurmctld slurmd munged mungekey sbatch srun squeue sinfo scontrol scancel; do
        command -v "$exe" >/dev/null ||
            die "$exe not found; apt-get install -y --no-install-recommends slurmctld slurmd slurm-client munge"
    done
    if live_pid "$DIR/run/slurmctld.pid" slurmctld >/dev/null &&
        live_pid "$DIR/run/slurmd.pid" slurmd >/dev/null; then
        echo "cluster.sh: already running in $DIR" >&2
    else
        mkdir -p "$DIR"/{etc,state,spool/slurmd,log,run}
        local port=${CGFLOW_SLURM_PORT:-}
        if [[ -z $port ]]; then
            port=16817
            while port_in_use "$port" || port_in_use $((port + 1)); do
                port=$((port + 2))
                ((port < 17817)) || die "no free port pair between 16817 and 17817"
            done
        fi
        write_config "$port" $((port + 1))
        start_munge
        # -c: start from an empty state (no jobs or node states of an earlier test run)
        live_pid "$DIR/run/slurmctld.pid" slurmctld >/dev/null || slurm slurmctld -c
        live_pid "$DIR/run/slurmd.pid" slurmd >/dev/null || slurm slurmd
    fi
    local deadline=$((SECONDS + TIMEOUT)) state=""
    while ((SECONDS < deadline)); do
        state=$(node_state || true)
        case $state in
        idle | mixed | allocated)
            echo "cluster.sh: node $NODE is $state (SLURM_CONF=$CONF)" >&2
            return 0
            ;;
        esac
        sleep 1
    done
    slurm sinfo -N -l >&2 || true
    slurm scontrol show node "$NODE" >&2 || true
    print_logs
    die "node $NODE not idle after ${TIMEOUT}s (state: ${state:-unknown})"
}

stop_pid() {
    local file=$1 name=$2 pid i
    pid=$(live_pid "$file" "$name") || return 0
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < 150; i++)); do
        [[ -d /proc/$pid ]] || break
        [[ $(cat "/proc/$pid/comm" 2>/dev/null) == "$name" ]] || break
        sleep 0.2
    done
    if [[ -d /proc/$pid && $(cat "/proc/$pid/comm" 2>/dev/null) == "$name" ]]; then
        kill -KILL "$pid" 2>/dev/null || true
    fi
    rm -f "$file"
}

stop() {
    if live_pid "$DIR/run/slurmctld.pid" slurmctld >/dev/null; then
        # cancel the jobs of this cluster and let slurmd clean up their step daemons
        local jobs
        jobs=$(slurm squeue --noheader --format=%i 2>/dev/null || true)
        # shellcheck disable=SC2086  # one argument per job id
        [[ -z $jobs ]] || slurm scancel --full --quiet $jobs 2>/dev/null || true
        local i
        for ((i = 0; i < 30; i++)); do
            [[ -z $(slurm squeue --noheader --states=RUNNING,COMPLETING,CONFIGURING 2>/dev/null) ]] && break
            sleep 1
        done
    fi
    stop_pid "$DIR/run/slurmd.pid" slurmd
    stop_pid "$DIR/run/slurmctld.pid" slurmctld
    stop_pid "$DIR/munge/munged.pid" munged
    echo "cluster.sh: stopped the cluster in $DIR" >&2
}

case $cmd in
start) start ;;
stop) stop ;;
env)
    echo "export SLURM_CONF=$CONF"
    echo "export PATH=$DIR/bin:\$PATH"
    ;;
status)
    slurm sinfo
    slurm squeue --states=all
    ;;
*) usage ;;
esac
