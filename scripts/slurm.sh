#!/usr/bin/env bash
# A single-node SLURM (Debian 12's SLURM 22.05) for the job-queue tests.
#
#   bash scripts/slurm.sh start    install if missing, configure, start munged,
#                                  slurmctld and slurmd, wait until the node is
#                                  idle; returns at once if it is already up
#   bash scripts/slurm.sh stop     cancel every job, stop the three daemons
#   bash scripts/slurm.sh status   daemons, node and queue; exit 0 only when up
#
# Needs root. No systemd: the daemons are started directly, each in its own
# session (they daemonize and are never children of the caller), with
# pidfiles in /run/slurm and /run/munge and logs in /var/log/slurm.
# The configuration is scripts/slurm/slurm.conf.in with the short hostname
# filled in, installed as /etc/slurm/slurm.conf (where sbatch and friends look);
# if it changed, `start` restarts the SLURM daemons (running jobs are cancelled).
# All traffic stays on 127.0.0.1. Facts measured on this machine are in
# scripts/slurm/README.md.
#
# Environment: SLURM_EXTRA_PACKAGES  more Debian packages to install with the
#              four (e.g. slurm-wlm-torque for qsub/qstat/qdel).
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
template="$here/slurm/slurm.conf.in"
conf=/etc/slurm/slurm.conf
logdir=/var/log/slurm
rundir=/run/slurm
ctld_pidfile="$rundir/slurmctld.pid"
slurmd_pidfile="$rundir/slurmd.pid"
munge_pidfile=/run/munge/munged.pid
packages=(slurmctld slurmd slurm-client munge)
# shellcheck disable=SC2206
extra_packages=(${SLURM_EXTRA_PACKAGES:-})
host="$(hostname -s)"

say() { echo "slurm.sh: $*" >&2; }
die() { say "$*"; exit 1; }

# shellcheck source=scripts/daemons.sh
. "$here/daemons.sh"

show_logs() {
    local f
    for f in "$logdir/slurmctld.log" "$logdir/slurmd.log" /var/log/munge/munged.log; do
        [ -f "$f" ] && { echo "--- tail $f" >&2; tail -n 20 "$f" >&2; }
    done
    return 0
}

installed() {
    local p
    for p in "${packages[@]}" "${extra_packages[@]}"; do
        [ "$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null)" = "install ok installed" ] || return 1
    done
}

install_packages() {
    installed && return 0
    mkdir -p "$logdir"
    say "installing ${packages[*]} ${extra_packages[*]}"
    export DEBIAN_FRONTEND=noninteractive
    local cmd=(apt-get install -y -q --no-install-recommends "${packages[@]}" "${extra_packages[@]}")
    if ! "${cmd[@]}" >"$logdir/apt.log" 2>&1; then
        say "apt-get install failed; apt-get update and retry"
        apt-get update -q >>"$logdir/apt.log" 2>&1 || true
        "${cmd[@]}" >>"$logdir/apt.log" 2>&1 || { tail -n 30 "$logdir/apt.log" >&2; die "apt-get install failed"; }
    fi
}

render_conf() {
    sed "s/@HOST@/$host/g" "$template"
}

munge_ok() { munge -n | unmunge >/dev/null; }

start_munge() {
    install -d -o munge -g munge -m 0755 /run/munge
    install -d -o munge -g munge -m 0700 /var/log/munge /var/lib/munge
    if [ ! -s /etc/munge/munge.key ]; then
        say "creating /etc/munge/munge.key"
        install -d -o munge -g munge -m 0700 /etc/munge
        dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
    fi
    chown munge:munge /etc/munge/munge.key
    chmod 0400 /etc/munge/munge.key
    if alive "$munge_pidfile" munged && munge_ok 2>/dev/null; then
        return 0
    fi
    # munged forks and its parent returns once the daemon is ready.
    setsid runuser -u munge -- /usr/sbin/munged </dev/null >>"$logdir/munged.out" 2>&1 \
        || { show_logs; die "munged did not start"; }
    wait_until 10 "munged" munge_ok || { show_logs; die "munge does not work"; }
}

ctld_up() { scontrol ping 2>/dev/null | grep -q 'is UP'; }

node_state() { sinfo --noheader --nodes="$host" --Node --format=%T 2>/dev/null | head -n1; }

node_idle() { [ "$(node_state)" = idle ]; }

# The node answers and can take jobs (idle, or busy with some).
node_usable() {
    case "$(node_state)" in
        idle|mixed|allocated|completing) return 0 ;;
        *) return 1 ;;
    esac
}

# Cancel every job and wait (up to 30 s) until none is left in squeue.
cancel_all_jobs() {
    ctld_up || return 0
    local ids
    ids="$(squeue --noheader --format=%i 2>/dev/null || true)"
    [ -z "$ids" ] && return 0
    # shellcheck disable=SC2086
    scancel $ids 2>/dev/null || true
    wait_until 30 "cancelled jobs to leave squeue" \
        bash -c '[ -z "$(squeue --noheader --format=%i)" ]' || say "jobs still in squeue: $(squeue --noheader --format='%i %T' | tr '\n' ' ')"
}

# stop_daemons PIDFILE:COMM...: SIGTERM to all at once (each takes ~2 s to
# exit), up to 10 s, then SIGKILL.
stop_daemons() {
    local d pids=()
    for d in "$@"; do
        if alive "${d%%:*}" "${d#*:}"; then
            pids+=("$(cat "${d%%:*}")")
        fi
        rm -f "${d%%:*}"
    done
    [ "${#pids[@]}" = 0 ] && return 0
    kill -TERM "${pids[@]}" 2>/dev/null || true
    if ! wait_until 10 "${*//:*/} to exit" pids_gone "${pids[@]}"; then
        kill -KILL "${pids[@]}" 2>/dev/null || true
        wait_until 5 "daemons to die" pids_gone "${pids[@]}" || true
    fi
}

pids_gone() {
    local pid
    for pid in "$@"; do
        kill -0 "$pid" 2>/dev/null && return 1
    done
    return 0
}

stop_slurm() {
    cancel_all_jobs
    stop_daemons "$slurmd_pidfile:slurmd" "$ctld_pidfile:slurmctld"
}

cmd_start() {
    [ "$(id -u)" = 0 ] || die "must run as root"
    local t0 conf_new changed=0
    t0="$(date +%s%N)"
    [ -f "$template" ] || die "missing $template"
    conf_new="$(render_conf)"
    if [ -f "$conf" ] && [ "$conf_new" = "$(cat "$conf")" ] && installed \
        && alive "$munge_pidfile" munged && alive "$ctld_pidfile" slurmctld \
        && alive "$slurmd_pidfile" slurmd && node_usable; then
        say "already up (node $host: $(node_state))"
        return 0
    fi
    install_packages
    install -d -m 0755 "$logdir" "$rundir" /etc/slurm /var/lib/slurm
    install -d -m 0700 /var/lib/slurm/slurmctld /var/lib/slurm/slurmd
    if [ ! -f "$conf" ] || [ "$conf_new" != "$(cat "$conf")" ]; then
        changed=1
    fi
    if [ "$changed" = 1 ] && { alive "$ctld_pidfile" slurmctld || alive "$slurmd_pidfile" slurmd; }; then
        say "configuration changed: restarting the SLURM daemons"
        stop_slurm
    fi
    printf '%s\n' "$conf_new" >"$conf.tmp" && mv "$conf.tmp" "$conf"
    start_munge
    if ! alive "$ctld_pidfile" slurmctld; then
        # -c: start from a clean state (no jobs, node states from slurm.conf).
        setsid /usr/sbin/slurmctld -c -f "$conf" </dev/null >>"$logdir/slurmctld.out" 2>&1 \
            || { show_logs; die "slurmctld did not start"; }
    fi
    wait_until 20 "slurmctld to answer" ctld_up || { show_logs; die "slurmctld is not up"; }
    if ! alive "$slurmd_pidfile" slurmd; then
        setsid /usr/sbin/slurmd -f "$conf" </dev/null >>"$logdir/slurmd.out" 2>&1 \
            || { show_logs; die "slurmd did not start"; }
    fi
    if ! wait_until 20 "node $host to be idle" node_usable; then
        # A node left DOWN/DRAIN by an earlier run: put it back once.
        scontrol update nodename="$host" state=resume >/dev/null 2>&1 || true
        wait_until 20 "node $host to be idle" node_usable \
            || { say "node state: $(node_state)"; show_logs; die "node $host is not usable"; }
    fi
    wait_until 20 "node $host to be idle" node_idle || true
    say "up in $(( ($(date +%s%N) - t0) / 1000000 )) ms (node $host: $(node_state); logs in $logdir)"
}

cmd_stop() {
    [ "$(id -u)" = 0 ] || die "must run as root"
    cancel_all_jobs
    stop_daemons "$slurmd_pidfile:slurmd" "$ctld_pidfile:slurmctld" "$munge_pidfile:munged"
    say "stopped"
}

cmd_status() {
    local rc=0 d
    for d in "munged:$munge_pidfile" "slurmctld:$ctld_pidfile" "slurmd:$slurmd_pidfile"; do
        if alive "${d#*:}" "${d%%:*}"; then
            echo "${d%%:*}: running (pid $(cat "${d#*:}"))"
        else
            echo "${d%%:*}: stopped"; rc=3
        fi
    done
    if ctld_up; then
        echo "node $host: $(node_state)"
        node_usable || rc=3
        sinfo
        squeue
    else
        echo "slurmctld: not answering"; rc=3
    fi
    return "$rc"
}

case "${1:-}" in
    start) cmd_start ;;
    stop) cmd_stop ;;
    status) cmd_status ;;
    *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
