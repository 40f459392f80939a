#!/usr/bin/env bash
# A private two-node Slurm cluster on this machine, for trying job scripts (and for the tests).
#
#   slurm/local_cluster.sh start DIR          # config, state and logs go to DIR (created); prints its env
#   slurm/local_cluster.sh run DIR sinfo      # any command inside the cluster's network namespace
#   slurm/local_cluster.sh run DIR sbatch --nodes 2 ... slurm/pretrain_7b_mixln.sh
#   slurm/local_cluster.sh stop DIR           # kills every process of the cluster (and its jobs) by PID
#
# Needs root (network namespaces, Slurm daemons), Debian's `slurm-wlm` (22.05) and `munge`
# (`apt-get install -y slurm-wlm munge`; tests/run.sh installs them when missing and run as root).
#
# What runs: `unshare -n` makes a network namespace with only loopback (nothing can reach outside);
# in it, one `munged` for slurmctld and the clients, `slurmctld`, and two `slurmd` nodes n1 and n2,
# each with its own `munged` (same key) and its own port. Facts this is built on (Slurm 22.05, glibc):
# - Slurm resolves addresses with getaddrinfo(AF_INET, AI_ADDRCONFIG), and glibc does not count
#   127.0.0.1 as a configured IPv4 address: lo also gets 127.0.0.2/8, and the nodes' NodeAddr are
#   127.0.0.2 and 127.0.0.3 (on lo through the /8). Node *names* resolve nowhere, as on many clusters.
# - Debian builds slurmd without --enable-multiple-slurmd; two slurmd on one host need their own
#   NodeHostname and Port. Each also gets its own munged (same key), as on a real cluster: with one
#   shared munged the second node's decode of a job credential is a "Replayed credential" to munged
#   (22.05.8 tolerated it here, an earlier report saw jobs rejected). Each slurmd's config differs only
#   in its munged socket, so DebugFlags=NO_CONF_HASH keeps the controller from flagging the hashes.
# - AuthInfo=...,cred_expire=5 lets a requeued job start again after seconds (default 120 s);
#   SchedulerParameters=sched_interval=2 starts submitted jobs within a second or two;
#   SlurmdParameters=config_overrides lets each node claim CPUS (default 4) CPUs, more than a laptop has.
# - `--signal=B:USR1@N` is checked by slurmctld only about every 30 s; `scancel --signal=USR1 --batch`
#   delivers at once (the tests use it to preempt).
# Environment: NODES (default 2), CPUS (per node, default 4), GPUS (GRES gpu count per node, default 0; needs GPUs and
# a gres.conf you adapt), SLURM_PORT_BASE (default 6817).
set -eEuo pipefail

die() { echo "local_cluster.sh: $*" >&2; exit 1; }
usage() { sed -n '2,8p' "$0" >&2; exit 2; }
[ $# -ge 2 ] || usage
cmd="$1" dir="$2"
shift 2

in_ns() {
    [ -f "$dir/netns.pid" ] || die "no cluster in $dir (start it first)"
    nsenter --net="/proc/$(cat "$dir/netns.pid")/ns/net" "$@"
}

start() {
    [ "$(id -u)" = 0 ] || die "needs root (network namespace, Slurm daemons)"
    for prog in munged slurmctld slurmd sbatch unshare nsenter ip; do
        command -v "$prog" >/dev/null || die "$prog not found: apt-get install -y slurm-wlm munge iproute2"
    done
    [ ! -e "$dir/netns.pid" ] || die "$dir already holds a cluster (stop it first)"
    mkdir -p "$dir"
    dir="$(cd "$dir" && pwd)"
    local nodes="${NODES:-2}" cpus="${CPUS:-4}" gpus="${GPUS:-0}" port="${SLURM_PORT_BASE:-6817}" n
    [ "$nodes" -ge 1 ] && [ "$nodes" -le 200 ] || die "NODES=$nodes: expected 1..200"
    mkdir -p "$dir/log" "$dir/state" "$dir/munge"
    chmod 700 "$dir/munge"
    head -c 1024 /dev/urandom > "$dir/munge/munge.key"
    chmod 400 "$dir/munge/munge.key"
    : > "$dir/plugstack.conf"

    # The namespace: a sleeping process holds it; everything else joins it with nsenter.
    setsid unshare -n sleep infinity < /dev/null > /dev/null 2>&1 &
    echo $! > "$dir/netns.pid"
    trap 'echo "local_cluster.sh: start failed (logs in $dir/log); stopping what was started" >&2; stop_cluster' ERR
    for _ in $(seq 50); do [ "$(readlink /proc/$!/ns/net)" != "$(readlink /proc/self/ns/net)" ] && break; sleep 0.1; done
    readlink "/proc/$!/ns/net" > "$dir/netns.id"  # stop finds the cluster's processes by it
    in_ns ip link set lo up
    in_ns ip addr add 127.0.0.2/8 dev lo

    for n in $(seq 0 "$nodes"); do  # munged 0: slurmctld and clients; munged N: node nN
        in_ns munged --force --socket="$dir/munge/m$n.socket" --key-file="$dir/munge/munge.key" \
            --pid-file="$dir/munge/m$n.pid" --log-file="$dir/log/munged$n.log" --seed-file="$dir/munge/m$n.seed"
    done

    local gres_conf="" gres_node=""
    if [ "$gpus" -gt 0 ]; then gres_conf="GresTypes=gpu"; gres_node="Gres=gpu:$gpus"; fi
    cat > "$dir/slurm.conf" <<EOF
ClusterName=mixln-local
SlurmctldHost=$(hostname -s)(127.0.0.2)
MailProg=/bin/true
SlurmctldPort=$port
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$dir/munge/m0.socket,cred_expire=5
DebugFlags=NO_CONF_HASH
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool/%n
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.%n.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.%n.log
PlugStackConfig=$dir/plugstack.conf
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SlurmdParameters=config_overrides
ReturnToService=2
JobRequeue=1
MinJobAge=600
KillWait=10
InactiveLimit=0
SlurmdTimeout=60
SlurmdDebug=${SLURMD_DEBUG:-info}
$gres_conf
EOF
    for n in $(seq 1 "$nodes"); do  # node nN listens on 127.0.0.(N+1), port base+N
        echo "NodeName=n$n NodeHostname=n$n NodeAddr=127.0.0.$((n + 1)) Port=$((port + n)) CPUs=$cpus" \
             "RealMemory=8000 $gres_node State=UNKNOWN" >> "$dir/slurm.conf"
    done
    echo "PartitionName=local Nodes=n[1-$nodes] Default=YES MaxTime=INFINITE State=UP" >> "$dir/slurm.conf"
    if [ "$gpus" != 0 ]; then  # Slurm drops GPUs without a File= device: copies of /dev/null stand in
        mkdir -p "$dir/fakegpu"
        for n in $(seq 0 $((gpus - 1))); do mknod "$dir/fakegpu/gpu$n" c 1 3; done
        echo "Name=gpu File=$dir/fakegpu/gpu[0-$((gpus - 1))]" > "$dir/gres.conf"
    fi
    for n in $(seq 1 "$nodes"); do  # each node's copy of the config differs only in its munged socket
        mkdir -p "$dir/n$n" "$dir/spool/n$n"
        sed "s#munge/m0.socket#munge/m$n.socket#" "$dir/slurm.conf" > "$dir/n$n/slurm.conf"
        [ ! -f "$dir/gres.conf" ] || cp "$dir/gres.conf" "$dir/n$n/gres.conf"
    done

    SLURM_CONF="$dir/slurm.conf" in_ns slurmctld -i -f "$dir/slurm.conf"
    for n in $(seq 1 "$nodes"); do
        SLURM_CONF="$dir/n$n/slurm.conf" in_ns slurmd -N "n$n" -f "$dir/n$n/slurm.conf"
    done
    local deadline=$((SECONDS + 60))
    until [ "$(SLURM_CONF="$dir/slurm.conf" in_ns sinfo -h -N -t idle -o %N 2>/dev/null | wc -l)" = "$nodes" ]; do
        if [ $SECONDS -gt $deadline ] || ! kill -0 "$(cat "$dir/slurmctld.pid" 2>/dev/null || echo x)" 2>/dev/null \
                || grep -q "state set to DRAIN\|not a valid controller" "$dir/log/slurmctld.log"; then
            tail -n 5 "$dir"/log/*.log >&2
            stop_cluster
            die "the $nodes nodes did not come up (logs above, in $dir/log)"
        fi
        sleep 0.3
    done
    trap - ERR
    echo "export SLURM_CONF=$dir/slurm.conf  # cluster up: nodes n[1-$nodes] at 127.0.0.[2-$((nodes + 1))]; run commands with: $0 run $dir CMD"
}

stop_cluster() {
    [ -f "$dir/netns.pid" ] || return 0
    local ns pid p
    pid="$(cat "$dir/netns.pid")"
    ns="$(cat "$dir/netns.id" 2>/dev/null || readlink "/proc/$pid/ns/net" 2>/dev/null || true)"
    if [ -n "$ns" ] && [ "$ns" != "$(readlink /proc/self/ns/net)" ]; then
        # Jobs first (their steps outlive slurmd), then every process in the cluster's namespace: the
        # daemons, job steps, the namespace's holder. A PID is only signalled while it is in there.
        SLURM_CONF="$dir/slurm.conf" timeout 5 nsenter --net="/proc/$pid/ns/net" scancel -u "$(id -un)" >/dev/null 2>&1 || true
        for sig in TERM KILL; do
            for p in /proc/[0-9]*; do
                if [ "$(readlink "$p/ns/net" 2>/dev/null)" = "$ns" ]; then  # the holder included
                    kill -s $sig "${p#/proc/}" 2>/dev/null || true
                fi
            done
            if [ $sig = TERM ]; then sleep 1; fi
        done
    fi
    rm -f "$dir/netns.pid" "$dir/netns.id"
}

case "$cmd" in
start) start ;;
stop) stop_cluster ;;
run) [ $# -ge 1 ] || usage; SLURM_CONF="$dir/slurm.conf" in_ns "$@" ;;
*) usage ;;
esac
