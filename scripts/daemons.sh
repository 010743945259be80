# Shell functions shared by scripts/slurm.sh and scripts/gridengine.sh (sourced,
# not run).  The caller defines say().

# alive PIDFILE COMM: the process named in PIDFILE runs and is COMM.
alive() {
    local pid
    [ -s "$1" ] || return 1
    pid="$(cat "$1" 2>/dev/null)" || return 1
    [ -n "$pid" ] && [ -r "/proc/$pid/comm" ] || return 1
    [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$2" ]
}

# wait_until SECONDS WHAT CMD...: poll CMD every 0.1 s until it succeeds.
wait_until() {
    local seconds="$1" what="$2"; shift 2
    local deadline=$(( $(date +%s%N) + seconds * 1000000000 ))
    until "$@" >/dev/null 2>&1; do
        if [ "$(date +%s%N)" -gt "$deadline" ]; then
            say "timed out after ${seconds}s waiting for $what"
            return 1
        fi
        sleep 0.1
    done
}
