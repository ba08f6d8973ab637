#!/usr/bin/env bash
# A throwaway SLURM cluster on this one machine, for the tests: munged + slurmctld + N slurmd "nodes"
# (n1, n2, ...) on 127.0.0.1, started by hand (no systemd), with no database and no network beyond loopback.
#
# Run:  slurm/testing/cluster.sh start DIR    # writes DIR/slurm.conf, starts the daemons, waits for IDLE nodes,
#                                             # prints `export SLURM_CONF=DIR/slurm.conf` (use it for sbatch etc.)
#       slurm/testing/cluster.sh status DIR   # sinfo + which recorded daemons are alive
#       slurm/testing/cluster.sh stop DIR     # stops the daemons THIS script started (recorded PIDs), nothing else
# Needs: root, Debian's slurmctld slurmd slurm-client munge (`make setup-slurm`).
# Produces: DIR/slurm.conf, DIR/log/{slurmctld,slurmd-n1,...,munged}.log, DIR/log/jobcomp.txt (one line per finished
# job: JobState=..., ExitCode=...), DIR/pids/<daemon> (the PIDs this script started).
# Env: DSR_SLURM_PORT   slurmctld port (default 17817); node i listens on PORT+i. Pick another if it is taken.
#      DSR_SLURM_NODES  number of fake nodes (default 2)     DSR_SLURM_CPUS  CPUs per node (default: cores / nodes)
#      DSR_SLURM_TIMEOUT seconds to wait for daemons and IDLE nodes (default 60)
set -euo pipefail

PORT=${DSR_SLURM_PORT:-17817}
NODES=${DSR_SLURM_NODES:-2}
CPUS=${DSR_SLURM_CPUS:-$(( $(nproc) / NODES > 0 ? $(nproc) / NODES : 1 ))}  # the nodes share this machine's cores
TIMEOUT=${DSR_SLURM_TIMEOUT:-60}

die() { echo "error: slurm/testing/cluster.sh: $*" >&2; exit 1; }

# ---------------------------------------------------------------- process helpers (by recorded PID only)
alive() {  # alive PID: running and not a zombie (killed daemons reparented to a non-reaping init linger as Z)
    local state
    state=$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null) || return 1
    [[ -n $state && $state != Z && $state != X ]]
}

ours() {  # ours NAME PID: the PID still runs the program we started (guards against PID reuse)
    [[ -r /proc/$2/cmdline ]] && tr '\0' ' ' <"/proc/$2/cmdline" | grep -q -- "$D"
}

start_daemon() {  # start_daemon NAME CMD...: background the daemon itself, so $! is its PID (not a subshell's)
    local name=$1
    shift
    "$@" >"$D/log/$name.stdout" 2>&1 </dev/null &
    echo $! >"$D/pids/$name"
}

stop_one() {  # stop_one NAME: SIGTERM the recorded PID, wait for it to exit, SIGKILL after 15 s
    local name=$1 pid i
    pid=$(cat "$D/pids/$name" 2>/dev/null) || return 0
    if alive "$pid" && ours "$name" "$pid"; then
        kill -TERM "$pid" 2>/dev/null || true
        for ((i = 0; i < 150; i++)); do alive "$pid" || break; sleep 0.1; done
        if alive "$pid"; then
            echo "cluster.sh: $name ($pid) ignored SIGTERM for 15 s, sending SIGKILL" >&2
            kill -KILL "$pid" 2>/dev/null || true
            for ((i = 0; i < 50; i++)); do alive "$pid" || break; sleep 0.1; done
        fi
    fi
    rm -f "$D/pids/$name"
}

wait_for() {  # wait_for SECONDS WHAT CMD...: poll CMD every 0.2 s
    local limit=$1 t0=$SECONDS
    shift 2  # $2 names what we wait for (for the reader)
    until "$@" >/dev/null 2>&1; do
        ((SECONDS - t0 < limit)) || return 1
        sleep 0.2
    done
}

port_free() { ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# ---------------------------------------------------------------- start
write_conf() {
    cat >"$D/slurm.conf" <<CONF
# Written by slurm/testing/cluster.sh: a throwaway test cluster on 127.0.0.1 (see the script's header).
ClusterName=dsrtest
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort=$PORT
SlurmUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire also sets how long a requeued job waits before it may start again (default 120 s).
AuthInfo=socket=$D/munge/munge.socket.2,cred_expire=10
StateSaveLocation=$D/state
SlurmdSpoolDir=$D/spool/%n
SlurmctldPidFile=$D/run/slurmctld.pid
SlurmdPidFile=$D/run/slurmd.%n.pid
SlurmctldLogFile=$D/log/slurmctld.log
SlurmdLogFile=$D/log/slurmd-%n.log
MailProg=/bin/true
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SlurmdParameters=config_overrides
MpiDefault=none
SchedulerType=sched/backfill
# Look at pending jobs every second (defaults: 60 s / 30 s), so a requeued job restarts promptly.
SchedulerParameters=sched_interval=1,bf_interval=1
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
KillWait=30
MinJobAge=600
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/filetxt
JobCompLoc=$D/log/jobcomp.txt
CONF
    local i
    for ((i = 1; i <= NODES; i++)); do
        echo "NodeName=n$i NodeHostname=localhost NodeAddr=127.0.0.1 Port=$((PORT + i)) CPUs=$CPUS RealMemory=1000 State=UNKNOWN" >>"$D/slurm.conf"
    done
    echo "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP" >>"$D/slurm.conf"
}

all_idle() {  # every node IDLE (not DOWN/DRAIN/UNKNOWN)
    local states
    states=$(sinfo -h -N -o '%T' 2>/dev/null) || return 1
    [[ $(grep -c . <<<"$states") -eq $NODES ]] && ! grep -qv '^idle$' <<<"$states"
}

start() {
    [[ $(id -u) -eq 0 ]] || die "must run as root (slurmd starts jobs as their user)"
    for b in munged slurmctld slurmd sinfo; do command -v $b >/dev/null || die "$b not found; run make setup-slurm"; done
    local i name
    for name in munged slurmctld $(for ((i = 1; i <= NODES; i++)); do echo slurmd-n$i; done); do
        if [[ -f $D/pids/$name ]] && alive "$(cat "$D/pids/$name")"; then die "$name already running in $D; stop it first"; fi
    done
    for ((i = 0; i <= NODES; i++)); do
        port_free $((PORT + i)) || die "port $((PORT + i)) on 127.0.0.1 is in use; set DSR_SLURM_PORT to another base port"
    done
    mkdir -p "$D"/{munge,state,spool,run,log,pids}
    chmod 755 "$D" "$D/munge"
    export SLURM_CONF=$D/slurm.conf
    write_conf

    # munge: a fresh 1024-byte key readable only by root
    rm -f "$D/munge/munge.key"
    head -c 1024 /dev/urandom >"$D/munge/munge.key"
    chmod 400 "$D/munge/munge.key"
    start_daemon munged munged -F --force --key-file="$D/munge/munge.key" --socket="$D/munge/munge.socket.2" \
        --pid-file="$D/run/munged.pid" --seed-file="$D/munge/seed" --log-file="$D/log/munged.log"
    wait_for "$TIMEOUT" "munge socket" test -S "$D/munge/munge.socket.2" || die "munged did not start; see $D/log/munged.*"

    start_daemon slurmctld slurmctld -D -c -i -f "$SLURM_CONF"
    wait_for "$TIMEOUT" slurmctld scontrol ping || die "slurmctld did not answer; see $D/log/slurmctld.log"
    for ((i = 1; i <= NODES; i++)); do
        start_daemon slurmd-n$i slurmd -D -f "$SLURM_CONF" -N n$i
    done
    if ! wait_for "$TIMEOUT" "idle nodes" all_idle; then
        sinfo -N >&2 || true
        die "nodes not IDLE after ${TIMEOUT}s; see $D/log/slurmd-*.log"
    fi
    echo "export SLURM_CONF=$SLURM_CONF"
}

stop() {
    [[ -d $D/pids ]] || return 0
    local name
    for name in $(ls "$D/pids" | grep '^slurmd-' || true) slurmctld munged; do
        stop_one "$name"
    done
}

status() {
    export SLURM_CONF=$D/slurm.conf
    sinfo -N || true
    local f
    for f in "$D"/pids/*; do
        [[ -e $f ]] || continue
        if alive "$(cat "$f")"; then echo "$(basename "$f") $(cat "$f") running"; else echo "$(basename "$f") $(cat "$f") dead"; fi
    done
}

# ---------------------------------------------------------------- main
[[ $# -eq 2 ]] || die "usage: $0 start|stop|status DIR"
D=$(mkdir -p "$2" && cd "$2" && pwd)
case $1 in
start) start ;;
stop) stop ;;
status) status ;;
*) die "unknown command $1 (start|stop|status)" ;;
esac
