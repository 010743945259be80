"""The MPI launcher: ``mpiexec -n N python -m cluster [options] [script.py args...]``.

Theory of operation
-------------------
Every rank parses the same command line (options also come from
``CLUSTER_<OPTION>`` environment variables; the command line wins), so a bad
option fails on every rank alike, before any MPI communication.  Then:

* **Without MPI** (no MPI launcher in the environment, mpi4py missing, or a
  world of one rank) the launcher starts a
  :class:`~cluster.runtime.local.LocalCluster` on this machine.  With a script it
  runs the script against it (``CLUSTER_SCHEDULER_ADDRESS`` tells the
  script's ``Client()`` where it is) and returns the script's exit status;
  without one it serves until the scheduler closes or a signal arrives.
  (Started by an MPI launcher without mpi4py, only rank 0 does this; the
  other ranks log a warning and return 0 at once.)
* **Under MPI** each rank takes its role (:func:`cluster.hpc.roles.role`): rank 0
  starts the scheduler -- on ``--interface``, ``--host``, loopback when all
  ranks share this node, or this node's routable address -- and broadcasts
  its address over MPI; every other rank starts a nanny (or, with
  ``--no-nanny``, a worker) named after its rank.  In script mode rank 0
  waits for the workers, runs the script in its own process as the client
  and then shuts the cluster down (``close(close_workers=True)``); in
  service mode the cluster runs until a client's ``shutdown()``,
  ``--idle-timeout`` or SIGTERM/SIGINT, and ``--scheduler-file`` (or the
  printed address) tells clients where it is.  :mod:`cluster.hpc.ranks` describes how
  each rank ends and :mod:`cluster.hpc.mpi` why no rank can hang at the end.

Exit status: the script's status (script mode), 0 after a clean shutdown
(service mode), 128 + signal number after SIGTERM/SIGINT, 1 when the cluster
failed (a worker rank that lost its scheduler, a scheduler that did not
start), 2 for a bad command line or a missing script.  Under MPI, when rank
0's status is non-zero every rank exits with it, so that ``mpiexec`` returns
exactly it (see :meth:`cluster.hpc.mpi.Job.finish`).
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import logging
import os
import sys
import textwrap
from collections.abc import Mapping, Sequence
from typing import Any

from cluster.runtime.options import (
    boolean,
    duration,
    env_var,
    memory_limit,
    port,
    positive_duration,
    positive_int,
    resources,
)
from cluster.runtime.process import child_environment, discard_warm, prewarm

from .mpi import Job, MPITimeout, env_rank, get_world, launched_by_mpi, scrub_rank_environment
from .ranks import (
    ENV_ADDRESS,
    EXIT_FAILURE,
    EXIT_NO_SCRIPT,
    FINISH_MARGIN,
    FINISH_TIMEOUT,
    ClusterOptions,
    SignalCatcher,
    default_nthreads,
    job_security,
    run_script,
    serve_scheduler,
    serve_worker,
)
from .roles import RoleOptions, expected_workers, role

logger = logging.getLogger("cluster.hpc.launcher")

#: Prefix of the environment variables that set options: ``--foo-bar`` is ``CLUSTER_FOO_BAR``.

EXIT_USAGE = 2



# ----------------------------------------------------------------------------- option types


















# ----------------------------------------------------------------------------- command line

#: The default of every option (the parser's own default, ``None``, means "not given", so
#: that a ``CLUSTER_<OPTION>`` variable can fill it in).
_DEFAULTS: dict[str, Any] = {
    "nthreads": None,
    "memory_limit": "auto",
    "local_directory": None,
    "interface": None,
    "host": None,
    "protocol": None,
    "scheduler_port": 0,
    "scheduler_file": None,
    "name": None,
    "nanny": True,
    "lifetime": None,
    "lifetime_stagger": None,
    "lifetime_restart": False,
    "resources": {},
    "death_timeout": 20.0,
    "idle_timeout": None,
    "startup_timeout": 120.0,
    "nworkers": None,
    "tls": True,
}


def build_parser(prog: str = "python -m cluster") -> argparse.ArgumentParser:
    """The launcher's argument parser (options default to ``None``: not given)."""
    p = argparse.ArgumentParser(
        prog=prog, allow_abbrev=False, formatter_class=argparse.RawDescriptionHelpFormatter,
        usage=f"mpiexec -n N {prog} [options] [script.py [args ...]]",
        description=(
            "Start a cluster in an MPI job: rank 0 runs the scheduler, every other rank a "
            "worker named after its rank.\nWith a script, rank 0 runs it as the client "
            "(Client() finds the cluster) and the job\nends with the script's exit status; "
            "without one, the cluster serves until a client's\nshutdown(), --idle-timeout or "
            "SIGTERM. Outside MPI, a LocalCluster on this machine."))
    add = p.add_argument
    add("--nthreads", type=positive_int, metavar="N",
        help="threads per worker (default: the node's cores shared among its worker ranks)")
    add("--memory-limit", type=memory_limit, metavar="LIMIT",
        help="memory limit per worker: auto (default), 4GB, a fraction like 0.5, or 0 for none")
    add("--local-directory", metavar="DIR", help="where workers put their files (default: temp dir)")
    add("--interface", metavar="IFACE",
        help="network interface every server listens on, e.g. ib0 (default: loopback when "
             "every rank is on this node, else this node's routable address)")
    add("--host", help="host the scheduler listens on (when --interface is not given)")
    add("--protocol", choices=["tcp"],
        help="'tcp': plain TCP, like --no-tls (default: tls:// unless --no-tls)")
    add("--tls", action=argparse.BooleanOptionalAction,
        help="encrypt and authenticate every connection with credentials made for this job "
             "on rank 0 and sent over MPI, never written to a file (default: on)")
    add("--scheduler-port", type=port, metavar="PORT", help="the scheduler's port (default: 0, any free port)")
    add("--scheduler-file", metavar="FILE",
        help="the scheduler writes its address to this JSON file, for Client(scheduler_file=FILE)")
    add("--name", metavar="PREFIX", help="prefix of the workers' names (default: the bare rank)")
    add("--nanny", action=argparse.BooleanOptionalAction,
        help="supervise each worker with a nanny that restarts it when it dies (default: on)")
    add("--lifetime", type=duration, metavar="DURATION", help="workers retire after this long")
    add("--lifetime-stagger", type=duration, metavar="DURATION",
        help="random +/- spread of --lifetime, so workers do not all retire at once")
    add("--lifetime-restart", action=argparse.BooleanOptionalAction,
        help="a nanny starts a fresh worker when its worker reaches --lifetime (default: off)")
    add("--resources", type=resources, metavar="SPEC",
        help="abstract resources of every worker, e.g. 'GPU=2,MEM=10e9'")
    add("--death-timeout", type=positive_duration, metavar="DURATION",
        help="a worker rank whose scheduler is unreachable this long exits with status 1 "
             "(default: 20s)")
    add("--idle-timeout", type=positive_duration, metavar="DURATION",
        help="the scheduler closes after this long without work (service mode)")
    add("--startup-timeout", type=positive_duration, metavar="DURATION",
        help="how long every rank may take to start, and the workers to register before the "
             "script runs anyway (default: 120s)")
    add("--nworkers", type=positive_int, metavar="N",
        help="number of workers without MPI (default: one per core); ignored under MPI")
    add("script", nargs="?", help="the Python script to run as the client (script mode)")
    add("args", nargs=argparse.REMAINDER, help="the script's arguments")
    names = ", ".join(env_var(a.option_strings[0]) for a in p._actions if a.dest in _DEFAULTS)
    p.epilog = "environment:\n" + textwrap.fill(
        "Every option --foo-bar can also be set with the environment variable CLUSTER_FOO_BAR; "
        "the command line wins. On/off options take 1/0, true/false, yes/no or on/off. "
        f"Here: {names}. The script's Client() finds the cluster through "
        f"{ENV_ADDRESS}, which the launcher sets.", width=78, initial_indent="  ",
        subsequent_indent="  ")
    return p


def parse_args(argv: Sequence[str], environ: Mapping[str, str] | None = None,
               prog: str = "python -m cluster") -> tuple[ClusterOptions, str | None, list[str]]:
    """Parse the command line, filling options not given from ``CLUSTER_<OPTION>`` variables.

    Returns:
        ``(options, script or None, script arguments)``.

    Raises:
        SystemExit: status 2 for a bad option or variable (argparse's message),
            0 after ``--help``.
    """
    environ = os.environ if environ is None else environ
    parser = build_parser(prog)
    ns = parser.parse_args(list(argv))
    values: dict[str, Any] = {}
    for action in parser._actions:
        dest = action.dest
        if dest not in _DEFAULTS:
            continue
        value = getattr(ns, dest)
        if value is None:
            long = action.option_strings[0]
            name = env_var(long)
            raw = environ.get(name, "")
            if raw.strip():
                convert = boolean if isinstance(action, argparse.BooleanOptionalAction) else action.type
                try:
                    value = convert(raw) if convert is not None else raw
                except (argparse.ArgumentTypeError, ValueError) as e:
                    parser.error(f"environment variable {name} (for {long}): {e}")
                if action.choices is not None and value not in action.choices:
                    parser.error(f"environment variable {name} (for {long}): invalid choice {raw!r} "
                                 f"(choose from {', '.join(map(repr, action.choices))})")
        values[dest] = _DEFAULTS[dest] if value is None else value
    if ns.script is None and ns.args:
        parser.error(f"unexpected arguments {ns.args!r} without a script")
    if ns.script is None and not values["scheduler_file"] and values["tls"] and values["protocol"] != "tcp":
        # A printed tls:// address is of no use without the credentials, which
        # only ever go to a 0600 file next to the scheduler file.
        parser.error("service mode (no script) with TLS needs --scheduler-file FILE: clients "
                     "outside the job find the address and the credentials there; or pass --no-tls")
    return ClusterOptions(**values), ns.script, list(ns.args or [])


# ----------------------------------------------------------------------------- main


def _configure_logging(rank: int | None) -> None:
    """Log warnings to stderr, tagged with the rank, unless the application configured logging."""
    root = logging.getLogger()
    if root.handlers:
        return
    where = f"rank {rank} " if rank is not None else ""
    logging.basicConfig(level=logging.WARNING,
                        format=f"%(asctime)s {where}%(name)s %(levelname)s %(message)s")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the launcher (``python -m cluster [options] [script.py args...]``); return the exit status.

    Args:
        argv: the arguments after the program name (default: ``sys.argv[1:]``).

    Returns:
        The exit status (see the module documentation).  Under MPI, rank 0's
        when it is non-zero, on every rank.
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        opts, script, script_args = parse_args(argv)
    except SystemExit as e:  # argparse: --help (0) or a usage error (2)
        return e.code if isinstance(e.code, int) else EXIT_USAGE
    if launched_by_mpi():
        if opts.nanny and (env_rank() or 0) > 0:
            _prewarm_worker_process()
        # A rank is a process of its own: what it has imported by now lives as
        # long as it does, and the collector need not walk it again -- nor the
        # interpreter at exit (~30 ms of CPU per rank).
        gc.freeze()
    try:
        return _main(opts, script, script_args)
    finally:
        discard_warm()  # unused (this rank did not start a worker after all)


def _main(opts: ClusterOptions, script: str | None, script_args: Sequence[str]) -> int:
    world = get_world()
    if world is None and launched_by_mpi() and (env_rank() or 0) > 0:
        # An MPI launcher started us, but without mpi4py the ranks cannot
        # cooperate: rank 0 alone runs a local cluster, the others step aside.
        _configure_logging(env_rank())
        logger.warning("mpi4py is not available: rank 0 runs a local cluster on its own; "
                       "this rank has nothing to do")
        return 0
    if world is None or world.Get_size() == 1:
        _configure_logging(None)
        if world is not None:
            scrub_rank_environment()  # MPI has read them; our worker processes must not
        return run_local(opts, script, script_args)
    _configure_logging(world.Get_rank())
    return run_mpi(world, opts, script, script_args)


def _prewarm_worker_process() -> None:
    """Fork this worker rank's worker process now, before ``MPI_Init``.

    The rank imports the worker's modules (it runs a nanny, which imports
    most of them anyway) and forks: the child waits for its options while MPI
    starts and the ranks meet, and the nanny then hands it its options and
    credentials (see :func:`cluster.runtime.process.prewarm`) instead of starting an
    interpreter that would import everything again -- about half the CPU of
    a worker rank.  Before ``MPI_Init`` because forking after it is unsafe
    with some MPI libraries; with the environment the worker gets anyway,
    without the launcher's per-rank variables.  Where forking is not safe
    (threads running), a fresh interpreter started now instead.
    """
    if importlib.util.find_spec("mpi4py") is None:  # no MPI job: this rank will not need it
        return
    import cluster.runtime.nanny  # noqa: F401 - imported before the fork: shared with the worker  # (side effect: import)
    import cluster.runtime.worker.process  # noqa: F401  # (side effect: import)

    # Out of the collector's sight before the fork: its passes would otherwise
    # write to (and so copy) every page of the imported code in the child.
    gc.freeze()
    env = child_environment()
    scrub_rank_environment(env)
    prewarm(env, fork=True)


def run_mpi(world: Any, opts: ClusterOptions, script: str | None, script_args: Sequence[str]) -> int:
    """Run this rank's part of the cluster under MPI; return its status (or abort the job).

    Args:
        world: ``MPI.COMM_WORLD``.
        opts: the launch options.
        script: the script rank 0 runs (``None``: service mode).
        script_args: its arguments.
    """
    signals = SignalCatcher().install()
    job: Job | None = None
    try:
        job = Job.start(world, opts.startup_timeout)
        names = job.allgather_names(opts.startup_timeout)
        role_options = RoleOptions(script=script is not None, name=opts.name)
        me = role(job.rank, job.size, role_options)
        workers = expected_workers(job.size, role_options)
        if me.is_scheduler:
            return serve_scheduler(job, opts, names, set(workers.values()), signals,
                                   script=script, script_args=script_args)
        info = job.bcast(None, opts.startup_timeout)
        if "address" not in info:  # rank 0 failed to start and says why
            return job.finish(0, FINISH_TIMEOUT + FINISH_MARGIN)
        scrub_rank_environment()
        local = sum(1 for r in workers if names[r] == names[job.rank])
        nthreads = opts.nthreads or default_nthreads(local)
        return serve_worker(job, info["address"], me.name, nthreads, opts, signals,
                            security=job_security(info))
    except MPITimeout as e:
        logger.error("%s; aborting the MPI job", e)
        if job is not None:
            job.abort(EXIT_FAILURE)
        world.Abort(EXIT_FAILURE)
        return EXIT_FAILURE  # pragma: no cover - MPI_Abort does not return
    finally:
        signals.restore()


def run_local(opts: ClusterOptions, script: str | None, script_args: Sequence[str]) -> int:
    """Without MPI: a LocalCluster, and the script run against it (or served until closed).

    Returns:
        The script's exit status; in service mode 0 once the scheduler closed,
        128 + signal number after SIGTERM/SIGINT; 1 if the cluster did not
        start, 2 if the script cannot be opened.
    """
    if script is not None and not os.path.isfile(script):
        sys.stderr.write(f"error: cannot open the script {script!r}: no such file\n")
        return EXIT_NO_SCRIPT
    signals = SignalCatcher().install()
    try:
        scheduler_kwargs = opts.scheduler_kwargs()
        port = scheduler_kwargs.pop("port")
        protocol = scheduler_kwargs.pop("protocol", None)
        worker_kwargs = opts.worker_kwargs()
        worker_kwargs.pop("interface", None)
        worker_kwargs.pop("protocol", None)
        mem = worker_kwargs.pop("memory_limit")
        from cluster.runtime.local import LocalCluster

        try:
            cluster = LocalCluster(n_workers=opts.nworkers, threads_per_worker=opts.nthreads,
                                   processes=True, nanny=opts.nanny, host=opts.host,
                                   security=None if opts.secure else False,
                                   interface=opts.interface, protocol=protocol, scheduler_port=port,
                                   memory_limit=mem, scheduler_kwargs=scheduler_kwargs, **worker_kwargs)
        except Exception as e:
            logger.error("the local cluster did not start: %s", e)
            return EXIT_FAILURE
        try:
            address = cluster.scheduler_address
            if signals.signum is not None:  # while the cluster started
                return signals.status
            if script is not None:
                return run_script(script, script_args, signals, {ENV_ADDRESS: address})
            if not opts.scheduler_file:
                sys.stdout.write(f"Scheduler at {address}\n")
                sys.stdout.flush()
            while cluster.scheduler.status not in ("closed", "failed") and signals.signum is None:
                signals.wait(0.1)
            return signals.status or 0
        finally:
            try:
                cluster.close(timeout=60)
            except Exception as e:
                logger.error("the local cluster did not close cleanly: %r", e)
    finally:
        signals.restore()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
