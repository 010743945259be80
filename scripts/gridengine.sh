#!/usr/bin/env bash
# A single-node Grid Engine (Debian 12's Grid Engine 8.1.9) for the job-queue tests.
#
#   bash scripts/gridengine.sh start    install if missing, configure, start sge_qmaster
#                                       and sge_execd, wait until the queue takes jobs;
#                                       returns at once if it is already up
#   bash scripts/gridengine.sh stop     delete every job, stop both daemons
#   bash scripts/gridengine.sh status   daemons, queue and jobs; exit 0 only when up
#
# Needs root. No systemd: the daemons are started directly, each in its own
# session (they daemonize; pidfiles under /var/spool/gridengine), logs in the
# spool directories' `messages` files.  Non-interactive install: the cell
# (`default`) and the master host (`hostname -s`) are preseeded with
# debconf, and /usr/sbin/policy-rc.d keeps the packages' init scripts from
# starting anything.  Before qmaster starts, `host_aliases` maps `localhost`
# (what 127.0.0.1 resolves back to here) to the host name.  Then: the host
# is a submit and execution host; queue `all.q` has 8 slots and the `smp`
# parallel environment ($pe_slots: one host); root may run jobs (min_uid 0);
# the scheduler runs every second and at each submission, accounting is
# flushed at once (so `qacct` knows a job as soon as it ended).  Configuration
# files are scripts/gridengine/*.conf (@HOST@ filled in).  Loopback only.
#
# Grid Engine's `qsub`/`qstat`/`qdel` are /usr/bin's (gridengine-client);
# the Torque-style commands of scripts/pbs.sh live in a private directory so
# both can be installed.  Facts measured here are in scripts/gridengine/README.md.
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
confdir="$here/gridengine"
export SGE_ROOT=/var/lib/gridengine SGE_CELL=default
common="$SGE_ROOT/$SGE_CELL/common"
spool=/var/spool/gridengine
qmaster_pidfile="$spool/qmaster/qmaster.pid"
host="$(hostname -s)"
# sge_execd names its spool directory after what it resolves itself as (here `localhost`).
execd_pidfile() {
    local f
    for f in "$spool"/execd/*/execd.pid; do
        [ -s "$f" ] && { echo "$f"; return 0; }
    done
    echo "$spool/execd/$host/execd.pid"
}
logdir=/var/log/gridengine
packages=(gridengine-master gridengine-exec gridengine-client)

say() { echo "gridengine.sh: $*" >&2; }
die() { say "$*"; exit 1; }

# shellcheck source=scripts/daemons.sh
. "$here/daemons.sh"

show_logs() {
    local f
    for f in "$spool/qmaster/messages" "$(dirname "$(execd_pidfile)")/messages" "$logdir/apt.log"; do
        [ -f "$f" ] && { echo "--- tail $f" >&2; tail -n 20 "$f" >&2; }
    done
    return 0
}

installed() {
    local p
    for p in "${packages[@]}"; do
        [ "$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null)" = "install ok installed" ] || return 1
    done
}

install_packages() {
    installed && return 0
    mkdir -p "$logdir"
    say "installing ${packages[*]}"
    local p q
    for p in gridengine-common "${packages[@]}"; do
        for q in "gridengineconfig boolean true" "gridenginecell string $SGE_CELL" \
                 "gridenginemaster string $host"; do
            echo "$p shared/$q"
        done
    done | debconf-set-selections
    export DEBIAN_FRONTEND=noninteractive
    local cmd=(apt-get install -y -q --no-install-recommends -o DPkg::Lock::Timeout=300
               "${packages[@]}")
    if ! "${cmd[@]}" >"$logdir/apt.log" 2>&1; then
        say "apt-get install failed; apt-get update and retry"
        apt-get update -q >>"$logdir/apt.log" 2>&1 || true
        "${cmd[@]}" >>"$logdir/apt.log" 2>&1 || { tail -n 30 "$logdir/apt.log" >&2; die "apt-get install failed"; }
    fi
}

render() { sed "s/@HOST@/$host/g" "$confdir/$1"; }

qmaster_up() { qstat -f >/dev/null 2>&1 && qconf -sh >/dev/null 2>&1; }

# The queue instance on this host is there and not in an alarm/unknown/disabled state.
queue_ready() {
    local line
    line="$(qstat -f -q "all.q@$host" 2>/dev/null | grep "^all.q@$host")" || return 1
    [ "$(echo "$line" | awk '{print NF}')" -eq 5 ]  # a sixth column is a state (au, d, E, ...)
}

configure() {
    local tmp
    tmp="$(mktemp -d)"
    # Global configuration: root may run jobs; accounting written at once.
    qconf -sconf global >"$tmp/global"
    sed -i -e 's/^min_uid .*/min_uid                      0/' \
        -e 's/^min_gid .*/min_gid                      0/' \
        -e 's/^ *flush_time=.*/                             flush_time=00:00:01 joblog=false sharelog=00:00:00 accounting_flush_time=00:00:00/' \
        "$tmp/global"
    qconf -Mconf "$tmp/global" >/dev/null
    # Scheduler: every second, and at each submission and job end.
    qconf -ssconf >"$tmp/sconf"
    sed -i -e 's/^schedule_interval .*/schedule_interval                 0:0:1/' \
        -e 's/^flush_submit_sec .*/flush_submit_sec                  1/' \
        -e 's/^flush_finish_sec .*/flush_finish_sec                  1/' \
        -e 's/^job_load_adjustments .*/job_load_adjustments              NONE/' \
        -e 's/^load_adjustment_decay_time .*/load_adjustment_decay_time        0:0:0/' \
        "$tmp/sconf"
    qconf -Msconf "$tmp/sconf" >/dev/null
    qconf -sh 2>/dev/null | grep -qx "$host" || qconf -ah "$host" >/dev/null
    qconf -ss 2>/dev/null | grep -qx "$host" || qconf -as "$host" >/dev/null
    render exec_host.conf >"$tmp/exec_host"
    if qconf -sel 2>/dev/null | grep -qx "$host"; then
        qconf -Me "$tmp/exec_host" >/dev/null
    else
        qconf -Ae "$tmp/exec_host" >/dev/null
    fi
    render smp.conf >"$tmp/smp"
    if qconf -spl 2>/dev/null | grep -qx smp; then qconf -Mp "$tmp/smp" >/dev/null
    else qconf -Ap "$tmp/smp" >/dev/null; fi
    render all.q.conf >"$tmp/all.q"
    if qconf -sql 2>/dev/null | grep -qx all.q; then qconf -Mq "$tmp/all.q" >/dev/null
    else qconf -Aq "$tmp/all.q" >/dev/null; fi
    rm -rf "$tmp"
}

delete_all_jobs() {
    qmaster_up || return 0
    local ids
    ids="$(qstat -u '*' 2>/dev/null | awk 'NR > 2 {print $1}')"
    [ -z "$ids" ] && return 0
    # shellcheck disable=SC2086
    qdel -f $ids >/dev/null 2>&1 || true
    wait_until 30 "deleted jobs to leave qstat" bash -c '[ -z "$(qstat -u "*")" ]' || true
}

stop_daemon() {  # PIDFILE COMM
    alive "$1" "$2" || return 0
    local pid
    pid="$(cat "$1")"
    kill -TERM "$pid" 2>/dev/null || true
    wait_until 15 "$2 to exit" bash -c "! kill -0 $pid" || kill -KILL "$pid" 2>/dev/null || true
}

cmd_start() {
    [ "$(id -u)" = 0 ] || die "must run as root"
    local t0
    t0="$(date +%s%N)"
    if installed && alive "$qmaster_pidfile" sge_qmaster && alive "$(execd_pidfile)" sge_execd \
        && queue_ready; then
        say "already up (queue all.q@$host)"
        return 0
    fi
    install_packages
    [ -f "$common/bootstrap" ] || die "$common/bootstrap missing: the cell was not created"
    echo "$host localhost" >"$common/host_aliases"
    echo "$host" >"$common/act_qmaster"
    install -d -o sgeadmin -g sgeadmin -m 0755 "$spool/qmaster" "$spool/execd" /run/gridengine
    if ! alive "$qmaster_pidfile" sge_qmaster; then
        setsid /usr/sbin/sge_qmaster </dev/null >>"$spool/qmaster.out" 2>&1 \
            || { show_logs; die "sge_qmaster did not start"; }
    fi
    wait_until 30 "sge_qmaster to answer" qmaster_up || { show_logs; die "sge_qmaster is not up"; }
    configure
    if ! alive "$(execd_pidfile)" sge_execd; then
        setsid /usr/sbin/sge_execd </dev/null >>"$spool/execd.out" 2>&1 \
            || { show_logs; die "sge_execd did not start"; }
    fi
    wait_until 60 "queue all.q@$host to take jobs" queue_ready \
        || { qstat -f >&2 || true; show_logs; die "queue all.q@$host is not usable"; }
    say "up in $(( ($(date +%s%N) - t0) / 1000000 )) ms (queue all.q@$host, 8 slots, pe smp)"
}

cmd_stop() {
    [ "$(id -u)" = 0 ] || die "must run as root"
    delete_all_jobs
    stop_daemon "$(execd_pidfile)" sge_execd
    stop_daemon "$qmaster_pidfile" sge_qmaster
    say "stopped"
}

cmd_status() {
    local rc=0
    alive "$qmaster_pidfile" sge_qmaster && echo "sge_qmaster: running" || { echo "sge_qmaster: stopped"; rc=3; }
    alive "$(execd_pidfile)" sge_execd && echo "sge_execd: running" || { echo "sge_execd: stopped"; rc=3; }
    if qmaster_up; then
        qstat -f
        queue_ready || rc=3
    else
        echo "sge_qmaster: not answering"; rc=3
    fi
    return "$rc"
}

case "${1:-}" in
    start) cmd_start ;;
    stop) cmd_stop ;;
    status) cmd_status ;;
    *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
