"""``python -m cluster submit``: the command line of :mod:`cluster.jobqueue.submit`.

Parses the options (argparse; a bad value exits with status 2 naming the
option), builds the job with :func:`~cluster.jobqueue.submit.make_mpi_spec`, and
prints the script (``--dry-run``), or submits it and prints the job id, and
with ``--wait`` exits with the job's status.  A failing batch command exits
with status 1 and its error, without a traceback.
"""

from __future__ import annotations

import argparse
import math
import re
import shlex
import sys
from collections.abc import Sequence

from cluster.runtime.options import positive_int

from .commands import Runner
from .errors import JobQueueError
from .job import JOB_NAME_PATTERN, environment_variables
from .plumbing import blocking
from .submit import (
    DEFAULT_MPI_JOB_NAME,
    DEFAULT_POLL_INTERVAL,
    SYSTEMS,
    make_mpi_spec,
    render_mpi_script,
    submit_spec_async,
)
from .units import parse_memory, parse_walltime


def _walltime(text: str) -> str:
    try:
        parse_walltime(text, "walltime")
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e).removeprefix("walltime=")) from None
    return text


def _memory(text: str) -> str:
    try:
        parse_memory(text, "memory")
    except (ValueError, TypeError) as e:
        raise argparse.ArgumentTypeError(str(e).removeprefix("memory=")) from None
    return text


def _ranks(text: str) -> int:
    value = positive_int(text)
    if value < 2:
        raise argparse.ArgumentTypeError(
            f"invalid value {text!r}: an MPI job needs at least 2 ranks (rank 0 runs the "
            "scheduler and the script, every other rank a worker)")
    return value


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"invalid value {text!r}: expected seconds above 0")
    return value


def _env_pair(text: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"invalid value {text!r}: expected NAME=VALUE")
    try:
        environment_variables({name: value})
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e).removeprefix("env: ")) from None
    return name, value


def _words(text: str) -> list[str]:
    try:
        return shlex.split(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"invalid value {text!r}: {e}") from None


def _job_name(text: str) -> str:
    if not JOB_NAME_PATTERN.match(text):
        raise argparse.ArgumentTypeError(f"invalid value {text!r}: expected a letter followed "
                                         "by letters, digits, '_', '.' or '-'")
    return text


#: Python option names whose command-line name is not ``--`` + the name with dashes.
_CLI_NAMES = {"script": "script", "ntasks": "-n/--ntasks",
              "cpus_per_task": "--cpus-per-task/--nthreads"}


def _cli_message(message: str) -> str:
    """``make_mpi_spec``'s message, headed by the command-line option it is about."""
    m = re.match(r"(\w+)(?:=|: )", message)
    if m is None:
        return message
    name = m.group(1)
    return f"argument {_CLI_NAMES.get(name, '--' + name.replace('_', '-'))}: {message}"


def build_parser(prog: str = "python -m cluster submit") -> argparse.ArgumentParser:
    """The argument parser of ``python -m cluster submit``."""
    p = argparse.ArgumentParser(
        prog=prog, allow_abbrev=False,
        usage=f"{prog} --system {{slurm,pbs,sge}} -n N [options] script.py [args ...]",
        description="Submit one batch job that runs script.py under the MPI launcher: "
                    "rank 0 runs the scheduler and the script (whose Client() finds the "
                    "cluster), every other rank a worker. Prints the job id.",
        epilog="Options go before the script; everything after it is the script's. "
               "Exit status: 0 after submitting (or --dry-run); with --wait the job's: 0 when "
               "it completed, its exit code (or 1) when it failed; 1 when a batch command "
               "failed; 2 for a bad option.")
    add = p.add_argument
    add("--system", required=True, type=str.lower, choices=SYSTEMS, help="the batch system")
    add("-n", "--ntasks", required=True, type=_ranks, metavar="N",
        help="MPI ranks (at least 2: rank 0 is the scheduler, the others are workers)")
    add("--walltime", type=_walltime, metavar="TIME",
        help="time limit, like 01:00:00, 1-12:00:00, 90m (default: the batch system's)")
    add("--queue", help="partition (SLURM) or queue (PBS, SGE)")
    add("--account", help="account to charge")
    add("--job-name", type=_job_name, default=DEFAULT_MPI_JOB_NAME,
        help=f"the job's name (default: {DEFAULT_MPI_JOB_NAME})")
    add("--memory", type=_memory, metavar="SIZE",
        help="memory of each rank, like 4GB or 3.5GiB (also each worker's --memory-limit)")
    add("--cpus-per-task", "--nthreads", dest="cpus_per_task", type=positive_int, default=1,
        metavar="N", help="CPUs of each rank = threads of each worker (default: 1)")
    add("--job-extra-directive", dest="job_extra_directives", action="append", default=[],
        metavar="LINE", help="an extra directive line (repeatable); write one that starts with "
                             "a dash with '=': --job-extra-directive=--exclusive")
    add("--launcher", default="mpirun", metavar="CMD",
        help="what starts the ranks: mpirun (default), mpiexec, srun (SLURM) or a path")
    add("--launcher-args", type=_words, default=[], metavar="ARGS",
        help="arguments of the launcher, as one string: --launcher-args='--mpi=pmi2'")
    add("--cluster-args", type=_words, default=[], metavar="ARGS",
        help="more options of 'python -m cluster', as one string: "
             "--cluster-args='--interface ib0'")
    add("--resource-spec", metavar="SPEC",
        help="PBS/SGE: the -l resource request instead of ours, e.g. nodes=1:ppn=4 (Torque)")
    add("--parallel-environment", metavar="PE",
        help="SGE: the parallel environment of the ranks' slots (default: smp)")
    add("--python", metavar="PATH", help=f"the Python of the ranks (default: {sys.executable})")
    add("--env", type=_env_pair, action="append", default=[], metavar="NAME=VALUE",
        help="export this variable in the job (repeatable)")
    add("--prologue", action="append", default=[], metavar="LINE",
        help="a shell line run before the launch, e.g. 'module load mpi' (repeatable)")
    add("--log-directory", "--output-dir", dest="log_directory", metavar="DIR",
        help="directory of the job's output files (created if missing)")
    add("--poll-interval", type=_seconds, default=DEFAULT_POLL_INTERVAL, metavar="SECONDS",
        help=f"with --wait: seconds between status calls (default: {DEFAULT_POLL_INTERVAL:g})")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--dry-run", action="store_true",
                      help="print the job script and submit nothing")
    mode.add_argument("--wait", action="store_true",
                      help="wait for the job to end and exit with its status")
    add("script", help="the Python script rank 0 runs")
    add("args", nargs=argparse.REMAINDER, help="the script's arguments")
    return p


def main(argv: Sequence[str] | None = None, prog: str = "python -m cluster submit",
         runner: Runner | None = None) -> int:
    """Run ``python -m cluster submit``; return the exit status.

    Args:
        argv: the arguments after ``submit``.
        prog: the program name for messages.
        runner: the subprocess seam (tests pass a fake).

    Returns:
        0 after a submission or ``--dry-run``; with ``--wait`` the job's
        status (:attr:`MPIJob.returncode`); 1 when a batch command failed;
        2 for a bad command line; 130 when interrupted while waiting (the job
        goes on).
    """
    parser = build_parser(prog)
    try:
        ns = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
        try:
            spec = make_mpi_spec(
                ns.script, ns.args, system=ns.system, ntasks=ns.ntasks,
                walltime=ns.walltime,
                cpus_per_task=ns.cpus_per_task, memory=ns.memory, queue=ns.queue,
                account=ns.account, job_name=ns.job_name,
                job_extra_directives=ns.job_extra_directives, launcher=ns.launcher,
                launcher_args=ns.launcher_args, cluster_args=ns.cluster_args, python=ns.python,
                env=dict(ns.env), prologue=ns.prologue, log_directory=ns.log_directory,
                resource_spec=ns.resource_spec, parallel_environment=ns.parallel_environment)
        except (ValueError, TypeError) as e:
            parser.error(_cli_message(str(e)))
    except SystemExit as e:  # argparse: --help (0) or a usage error (2)
        return e.code if isinstance(e.code, int) else 2
    try:
        if ns.dry_run:
            sys.stdout.write(render_mpi_script(spec))
            sys.stdout.flush()
            return 0
        job = blocking(lambda: submit_spec_async(spec, runner=runner))
        sys.stdout.write(f"{job.job_id}\n")
        sys.stdout.flush()
        if not ns.wait:
            return 0
        try:
            state = job.wait(poll_interval=ns.poll_interval)
        except KeyboardInterrupt:
            sys.stderr.write(f"{prog}: stopped waiting; {spec.system} job {job.job_id} goes on\n")
            return 130
        code = "unknown" if job.exit_code is None else job.exit_code
        sys.stderr.write(f"{prog}: {spec.system} job {job.job_id} {state} (exit code {code})\n")
        return job.returncode if job.returncode is not None else 1
    except JobQueueError as e:
        sys.stderr.write(f"{prog}: error: {e}\n")
        return 1



__all__ = ["build_parser", "main"]
