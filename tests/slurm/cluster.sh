#!/usr/bin/env bash
# A throwaway single-node Slurm cluster on loopback, for hpcvm's Slurm tests.
#
#   cluster.sh start    install slurm-wlm and munge if missing, generate the config
#                       and a munge key, start munged, slurmctld and slurmd, wait
#                       until the node is idle.  Does nothing if already running.
#   cluster.sh stop     cancel every job, stop the daemons this script started,
#                       kill leftover job steps of this cluster.  Always safe.
#   cluster.sh status   say what runs; exit 0 if the cluster is up, 3 if stopped,
#                       1 if only part of it runs.
#   cluster.sh env      print `export SLURM_CONF=...` for srun/sbatch/squeue.
#
# Everything lives in $HPCVM_SLURM_DIR (default /tmp/hpcvm-slurm): the config
# (etc/slurm.conf, made from slurm.conf.in beside this script), the munge key and
# socket, state and spool dirs, pid files and logs.  Nothing under /etc is touched
# apart from what the Debian packages install; the system's munged/slurmd (if any)
# are left alone: this cluster uses its own munge socket and its own ports
# ($HPCVM_SLURM_PORT, default 16817, and the next one for slurmd).
#
# Daemons run as root, daemonized, no systemd needed.  Process tracking is
# proctrack/linuxproc (the process tree) and task/affinity (sched_setaffinity),
# so no cgroup plugin is needed.  See README.md beside this script.
set -euo pipefail
export LC_ALL=C

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
DIR=${HPCVM_SLURM_DIR:-/tmp/hpcvm-slurm}
PORT=${HPCVM_SLURM_PORT:-16817}
PARTITION=hpcvm
CONF=$DIR/etc/slurm.conf
MUNGE_SOCKET=$DIR/munge/munge.socket.2
START_TIMEOUT=${HPCVM_SLURM_START_TIMEOUT:-60}

export SLURM_CONF=$CONF

log() { echo "cluster.sh: $*" >&2; }
die() { echo "cluster.sh: error: $*" >&2; exit 1; }

usage() { sed -n '2,21p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }

# ---------------------------------------------------------------------------
# Packages

installed() { [ "$(dpkg-query -W -f='${db:Status-Status}' "$1" 2>/dev/null)" = installed ]; }

install_packages() {
    local missing=()
    local p
    for p in slurm-wlm munge; do
        installed "$p" || missing+=("$p")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    [ "$(id -u)" -eq 0 ] || die "missing packages ${missing[*]}; run as root (apt-get install ${missing[*]})"
    log "installing ${missing[*]}"
    # The packages' maintainer scripts try to start munge/slurmd/slurmctld through
    # systemd or init scripts.  There is no init system to start them here (and we
    # start our own), so deny service starts for the duration of the install
    # unless a policy is already in place.
    local policy=/usr/sbin/policy-rc.d made_policy=0
    if [ ! -e "$policy" ]; then
        printf '#!/bin/sh\nexit 101\n' >"$policy"
        chmod 755 "$policy"
        made_policy=1
    fi
    local rc=0
    {
        DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${missing[@]}" ||
            { apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${missing[@]}"; }
    } >"$DIR/log/apt.log" 2>&1 || rc=$?
    [ $made_policy -eq 1 ] && rm -f "$policy"
    if [ $rc -ne 0 ]; then
        tail -n 30 "$DIR/log/apt.log" >&2
        die "apt-get install ${missing[*]} failed (log: $DIR/log/apt.log)"
    fi
}

# ---------------------------------------------------------------------------
# Processes

# pid in FILE if that process is alive and is COMM (so a recycled pid is never
# mistaken for ours).
live_pid() {
    local file=$1 comm=$2 pid
    [ -s "$file" ] || return 1
    pid=$(tr -dc '0-9' <"$file")
    [ -n "$pid" ] && [ -r "/proc/$pid/comm" ] || return 1
    [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$comm" ] || return 1
    echo "$pid"
}

# slurmstepd processes of this cluster: they hold our slurmd log open.
our_stepds() {
    local p
    for p in /proc/[0-9]*; do
        [ "$(cat "$p/comm" 2>/dev/null)" = slurmstepd ] || continue
        local fd
        for fd in "$p"/fd/*; do
            if [[ $(readlink "$fd" 2>/dev/null) == "$DIR"/* ]]; then
                echo "${p#/proc/}"
                break
            fi
        done
    done
}

# Every process below pid $1 (its children, their children, ...).
descendants() {
    local root=$1 p pid ppid
    declare -A parent=()
    for p in /proc/[0-9]*; do
        pid=${p#/proc/}
        # Field 4 of /proc/PID/stat, after the parenthesised command name.
        ppid=$(sed -n 's/^.*) [A-Za-z] \([0-9]*\) .*$/\1/p' "$p/stat" 2>/dev/null) || continue
        [ -n "$ppid" ] && parent[$pid]=$ppid
    done
    for pid in "${!parent[@]}"; do
        p=${parent[$pid]}
        while [ -n "$p" ] && [ "$p" != 0 ] && [ "$p" != 1 ]; do
            if [ "$p" = "$root" ]; then
                echo "$pid"
                break
            fi
            p=${parent[$p]:-}
        done
    done
}

# Waits up to $2 seconds for pid $1 to exit.
wait_gone() {
    local pid=$1 secs=$2 i
    for ((i = 0; i < secs * 10; i++)); do
        [ -d "/proc/$pid" ] || return 0
        # A zombie child of ours counts as gone.
        [ "$(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null)" = Z ] && return 0
        sleep 0.1
    done
    return 1
}

STOPPED=()

stop_pid() {
    local name=$1 pid=$2
    log "stopping $name (pid $pid)"
    STOPPED+=("$pid")
    kill -TERM "$pid" 2>/dev/null || return 0
    if ! wait_gone "$pid" 10; then
        log "$name (pid $pid) ignored SIGTERM for 10 s; SIGKILL"
        kill -KILL "$pid" 2>/dev/null || true
        wait_gone "$pid" 5 || log "warning: $name (pid $pid) survived SIGKILL"
    fi
}

munged_pid() { live_pid "$DIR/munge/munged.pid" munged; }
slurmctld_pid() { live_pid "$DIR/run/slurmctld.pid" slurmctld; }
slurmd_pid() { live_pid "$DIR/run/slurmd.pid" slurmd; }

node_name() { hostname -s; }

node_state() { sinfo -h -n "$(node_name)" -o '%T' 2>/dev/null | head -n 1; }

show_logs() {
    local f
    for f in "$DIR"/munge/munged.log "$DIR"/log/slurmctld.log "$DIR"/log/slurmd.log; do
        [ -s "$f" ] || continue
        echo "---- last lines of $f ----" >&2
        tail -n 25 "$f" >&2
    done
}

# ---------------------------------------------------------------------------
# Config

# @KEY@ -> value in a template.
render() {
    local tpl=$1 out=$2
    sed -e "s|@DIR@|$DIR|g" \
        -e "s|@PORT@|$PORT|g" \
        -e "s|@SLURMD_PORT@|$((PORT + 1))|g" \
        -e "s|@MUNGE_SOCKET@|$MUNGE_SOCKET|g" \
        -e "s|@NODE@|$(node_name)|g" \
        -e "s|@NODE_HW@|$NODE_HW|g" \
        -e "s|@PARTITION@|$PARTITION|g" \
        "$tpl" >"$out.new"
    mv "$out.new" "$out"
}

write_config() {
    # The node as slurmd itself sees it: CPUs, sockets/cores/threads, RealMemory.
    # (`slurmd -C` prints "NodeName=... CPUs=2 Boards=1 ... RealMemory=24105".)
    local hw
    hw=$(slurmd -C 2>/dev/null | head -n 1) || true
    [[ $hw == NodeName=* ]] || die "slurmd -C printed no node line: '$hw'"
    NODE_HW=$(echo "$hw" | tr ' ' '\n' | grep -E '^(CPUs|Boards|SocketsPerBoard|CoresPerSocket|ThreadsPerCore|RealMemory)=' | tr '\n' ' ')
    NODE_HW=${NODE_HW% }
    render "$HERE/slurm.conf.in" "$CONF"
}

make_dirs() {
    mkdir -p "$DIR"
    chmod 755 "$DIR"
    mkdir -p "$DIR"/{etc,log,run,state/ctld,state/d,jobs}
    # munged wants a key readable only by its user (0600) in a dir only it can write;
    # the dir stays searchable so that users other than root can reach the socket.
    mkdir -p "$DIR/munge"
    chmod 755 "$DIR/munge"
    chmod 777 "$DIR/jobs"
    chmod +t "$DIR/jobs"
}

munge_key() {
    local key=$DIR/munge/munge.key
    [ -s "$key" ] && return 0
    log "generating munge key $key"
    if command -v mungekey >/dev/null; then
        mungekey --create --keyfile="$key" --force
    else
        dd if=/dev/urandom of="$key" bs=1 count=1024 status=none
    fi
    chmod 600 "$key"
}

# ---------------------------------------------------------------------------
# Commands

start_munged() {
    munged_pid >/dev/null && return 0
    log "starting munged (socket $MUNGE_SOCKET)"
    rm -f "$MUNGE_SOCKET" "$MUNGE_SOCKET.lock"
    # --force: munged refuses to run as root and to use a socket outside
    # /run/munge without it.
    munged --force \
        --socket="$MUNGE_SOCKET" \
        --key-file="$DIR/munge/munge.key" \
        --pid-file="$DIR/munge/munged.pid" \
        --log-file="$DIR/munge/munged.log" \
        --seed-file="$DIR/munge/munged.seed" \
        </dev/null >>"$DIR/munge/munged.log" 2>&1 ||
        { show_logs; return 1; }
    local i
    for ((i = 0; i < 50; i++)); do
        [ -S "$MUNGE_SOCKET" ] && munged_pid >/dev/null && break
        sleep 0.1
    done
    munge -S "$MUNGE_SOCKET" -n </dev/null | unmunge -S "$MUNGE_SOCKET" >/dev/null 2>&1 ||
        { log "munged does not answer on $MUNGE_SOCKET"; return 1; }
}

start_slurmctld() {
    slurmctld_pid >/dev/null && return 0
    log "starting slurmctld (port $PORT)"
    # -i: ignore state files that do not match this config.
    slurmctld -i -f "$CONF" </dev/null >>"$DIR/log/slurmctld.stdio" 2>&1
}

start_slurmd() {
    slurmd_pid >/dev/null && return 0
    log "starting slurmd (node $(node_name), port $((PORT + 1)))"
    slurmd -f "$CONF" </dev/null >>"$DIR/log/slurmd.stdio" 2>&1
}

wait_idle() {
    local i state=""
    for ((i = 0; i < START_TIMEOUT * 2; i++)); do
        state=$(node_state || true)
        case "$state" in
            idle* | mixed* | allocated* | completing*) return 0 ;;
            down* | drain* | fail*)
                # A node that was down before (e.g. after a crash) must be told it
                # may take jobs again.
                scontrol update nodename="$(node_name)" state=resume >/dev/null 2>&1 || true ;;
        esac
        sleep 0.5
    done
    log "node $(node_name) not idle after ${START_TIMEOUT} s (state: '${state:-unknown}')"
    sinfo -N -l >&2 2>&1 || true
    scontrol show node "$(node_name)" >&2 2>&1 || true
    return 1
}

cmd_start() {
    if munged_pid >/dev/null && slurmctld_pid >/dev/null && slurmd_pid >/dev/null; then
        if wait_idle; then
            log "already running ($CONF)"
            return 0
        fi
    fi
    make_dirs
    install_packages
    munge_key
    # Regenerate the config only while slurmctld/slurmd are down (they read it once),
    # and then start from a clean slate: no jobs or node states from an earlier run.
    if ! slurmctld_pid >/dev/null && ! slurmd_pid >/dev/null; then
        write_config
        rm -rf "${DIR:?}"/state/ctld/* "${DIR:?}"/state/d/*
        local f
        for f in "$DIR"/log/slurmctld.log "$DIR"/log/slurmd.log "$DIR"/log/jobcomp.log; do
            [ -f "$f" ] && mv -f "$f" "$f.old"
        done
    fi
    if start_munged && start_slurmctld && start_slurmd && wait_idle; then
        log "cluster up: node $(node_name), partition $PARTITION; export SLURM_CONF=$CONF"
        return 0
    fi
    log "start failed; logs:"
    show_logs
    cmd_stop || true
    return 1
}

cmd_stop() {
    local pid
    # Jobs first, while slurmctld and slurmd can still end them cleanly
    # (SIGCONT+SIGTERM, KillWait, SIGKILL).
    if slurmctld_pid >/dev/null && slurmd_pid >/dev/null && munged_pid >/dev/null; then
        local jobs
        jobs=$(squeue -h -o '%i' 2>/dev/null || true)
        if [ -n "$jobs" ]; then
            log "cancelling jobs: ${jobs//$'\n'/ }"
            # shellcheck disable=SC2086
            scancel $jobs 2>/dev/null || true
            local i
            for ((i = 0; i < 60; i++)); do
                [ -z "$(squeue -h -o '%i' 2>/dev/null)" ] && break
                sleep 0.5
            done
        fi
    fi
    if pid=$(slurmd_pid); then stop_pid slurmd "$pid"; fi
    if pid=$(slurmctld_pid); then stop_pid slurmctld "$pid"; fi
    # Steps whose slurmd is gone would wait forever for it: end them and their tasks.
    local tasks
    for pid in $(our_stepds); do
        log "killing leftover slurmstepd $pid ($(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null)) and its tasks"
        tasks=$(descendants "$pid")
        # shellcheck disable=SC2086
        [ -z "$tasks" ] || kill -KILL $tasks 2>/dev/null || true
        kill -KILL "$pid" 2>/dev/null || true
        STOPPED+=("$pid")
    done
    if pid=$(munged_pid); then stop_pid munged "$pid"; fi
    rm -f "$DIR/run/slurmd.pid" "$DIR/run/slurmctld.pid" "$DIR/munge/munged.pid"
    # The daemons are children of PID 1 once daemonized; give it a moment to reap
    # them, so `stop` returns with nothing of ours in the process table.
    local i
    for ((i = 0; i < 50; i++)); do
        [ ${#STOPPED[@]} -eq 0 ] && break
        local still=()
        for pid in "${STOPPED[@]}"; do [ -d "/proc/$pid" ] && still+=("$pid"); done
        STOPPED=("${still[@]}")
        [ ${#STOPPED[@]} -eq 0 ] && break
        sleep 0.1
    done
    return 0
}

cmd_status() {
    local up=0 n=0 pid name
    for name in munged slurmctld slurmd; do
        n=$((n + 1))
        if pid=$(${name}_pid); then
            echo "$name: running (pid $pid)"
            up=$((up + 1))
        else
            echo "$name: stopped"
        fi
    done
    if [ $up -eq $n ]; then
        echo "node $(node_name): $(node_state || echo unknown)"
        echo "SLURM_CONF=$CONF"
        return 0
    fi
    [ $up -eq 0 ] && return 3
    return 1
}

case "${1:-}" in
    start) cmd_start ;;
    stop) cmd_stop ;;
    status) cmd_status ;;
    env) echo "export SLURM_CONF=$CONF" ;;
    -h | --help | help) usage ;;
    *) usage >&2; exit 2 ;;
esac
