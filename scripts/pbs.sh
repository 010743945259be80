#!/usr/bin/env bash
# Torque-style PBS commands (qsub, qstat, qdel) for the job-queue tests: Debian 12's
# slurm-wlm-torque 22.05, running jobs on the SLURM of scripts/slurm.sh.
#
#   bash scripts/pbs.sh start     install if missing; print the directory of the commands
#   bash scripts/pbs.sh dir       print that directory (exit 1 when not installed)
#
# These are real programs (Perl, on SLURM's own Perl API): `qsub` runs `sbatch`,
# which reads the script's #PBS directives (-N, -l walltime=, -l nodes=1:ppn=N,
# -l mem=, -q, -o/-e, ...) and sets PBS_JOBID/PBS_O_WORKDIR; `qstat` prints Torque's
# table; `qdel` cancels.  slurm-wlm-torque conflicts with gridengine-client over
# /usr/bin/qsub, and CI needs both, so the package is not installed: its files are
# unpacked (`dpkg-deb -x`) into $PBS_DIR (default /opt/hpc-cluster/torque), its
# Perl dependencies installed with apt, and links to sbatch & co. put beside the
# wrappers (they call "$FindBin::Bin/sbatch").  Tests put $PBS_DIR/bin first on
# PATH for PBS only.  Needs root.
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
root="${PBS_DIR:-/opt/hpc-cluster/torque}"
bindir="$root/bin"
logdir=/var/log/slurm
deps=(libslurm-perl libslurmdb-perl libswitch-perl perl)

say() { echo "pbs.sh: $*" >&2; }
die() { say "$*"; exit 1; }

ready() {
    [ -x "$bindir/qsub" ] && [ -x "$bindir/qstat" ] && [ -x "$bindir/qdel" ] && [ -e "$bindir/sbatch" ] \
        && perl -MSlurm -e 1 2>/dev/null
}

cmd_start() {
    [ "$(id -u)" = 0 ] || die "must run as root"
    local t0 tmp
    t0="$(date +%s%N)"
    bash "$here/slurm.sh" start
    if ready; then
        echo "$bindir"
        return 0
    fi
    mkdir -p "$logdir"
    export DEBIAN_FRONTEND=noninteractive
    local cmd=(apt-get install -y -q --no-install-recommends -o DPkg::Lock::Timeout=300 "${deps[@]}")
    if ! "${cmd[@]}" >"$logdir/pbs-apt.log" 2>&1; then
        apt-get update -q >>"$logdir/pbs-apt.log" 2>&1 || true
        "${cmd[@]}" >>"$logdir/pbs-apt.log" 2>&1 || { tail -n 30 "$logdir/pbs-apt.log" >&2; die "apt-get install failed"; }
    fi
    tmp="$(mktemp -d)"
    (cd "$tmp" && apt-get download -q slurm-wlm-torque >>"$logdir/pbs-apt.log" 2>&1) \
        || { rm -rf "$tmp"; tail -n 30 "$logdir/pbs-apt.log" >&2; die "apt-get download slurm-wlm-torque failed"; }
    rm -rf "$root.new" && mkdir -p "$root.new"
    dpkg-deb -x "$tmp"/slurm-wlm-torque_*.deb "$tmp/x"
    mkdir -p "$root.new/bin"
    local c
    for c in qsub qstat qdel qalter qhold qrls pbsnodes; do
        cp "$tmp/x/usr/bin/$c" "$root.new/bin/$c"
    done
    for c in sbatch salloc srun squeue scontrol scancel sinfo; do
        ln -s "/usr/bin/$c" "$root.new/bin/$c"
    done
    rm -rf "$tmp" "$root"
    mv "$root.new" "$root"
    ready || die "the PBS commands in $bindir do not work"
    say "PBS commands (slurm-wlm-torque) in $bindir, set up in $(( ($(date +%s%N) - t0) / 1000000 )) ms"
    echo "$bindir"
}

case "${1:-}" in
    start) cmd_start ;;
    dir) ready && echo "$bindir" ;;
    *) echo "usage: $0 start|dir" >&2; exit 2 ;;
esac
