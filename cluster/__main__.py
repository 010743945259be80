"""``python -m cluster`` (also installed as ``hpc-cluster``): the command line.

Usage::

    python -m cluster scheduler [options]            # start a scheduler
    python -m cluster worker ADDRESS [options]       # start workers (or --scheduler-file F)
    python -m cluster submit --system slurm -n N script.py ...  # one MPI batch job
    python -m cluster config [PREFIX]                # the effective configuration
    python -m cluster [launcher options] script ...  # anything else: the MPI launcher

``scheduler`` and ``worker`` are implemented in :mod:`cluster.cli`, ``submit``
in :mod:`cluster.jobqueue.submit_cli` (imported only then, so that the other commands do
not load jinja2), ``config`` in :mod:`cluster.config_cli`; every other command line is handed unchanged to
:func:`cluster.hpc.launcher.main`, imported only then (so the subcommands work
without MPI).
"""

from __future__ import annotations

import importlib
import os
import sys

#: Subcommands implemented by :mod:`cluster.cli`.
SUBCOMMANDS = ("scheduler", "worker")

#: Name of the console script declared in ``pyproject.toml``.
CONSOLE_SCRIPT = "hpc-cluster"


def _prog() -> str:
    """How the user called us, for usage and error messages."""
    name = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    return CONSOLE_SCRIPT if name == CONSOLE_SCRIPT else "python -m cluster"


def _error(prog: str, message: str) -> None:
    sys.stderr.write(f"{prog}: error: {message}\n")


def main(argv: list[str] | None = None) -> int:
    """Run one command line and return its exit status.

    Args:
        argv: the arguments after the program name (default: ``sys.argv[1:]``).

    Returns:
        The exit status: 0 on success, 2 for a command line we cannot run
        (including the launcher not being installed), otherwise what the
        subcommand or launcher returned.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    prog = _prog()
    if argv and argv[0] in SUBCOMMANDS:
        from . import cli

        return cli.main(argv, prog=prog)
    if argv and argv[0] == "submit":
        from cluster.jobqueue.submit_cli import main as submit

        return submit(argv[1:], prog=f"{prog} submit")
    if argv and argv[0] == "config":
        from .config_cli import main as config

        return config(argv[1:], prog=f"{prog} config")
    try:
        launcher = importlib.import_module("cluster.hpc.launcher")
    except ImportError as e:
        if isinstance(e, ModuleNotFoundError) and e.name in ("cluster.hpc", "cluster.hpc.launcher"):
            reason = "the MPI launcher (cluster.hpc.launcher) is not available in this installation"
        else:
            reason = f"the MPI launcher (cluster.hpc.launcher) could not be imported: {e}"
        _error(prog, f"{reason}. Available commands: {', '.join(SUBCOMMANDS)}, config "
               f"(see '{prog} scheduler --help' and '{prog} worker --help')")
        return 2
    launch = getattr(launcher, "main", None)
    if not callable(launch):
        _error(prog, "the MPI launcher (cluster.hpc.launcher) has no main(argv) function")
        return 2
    status = launch(argv)
    return 0 if status is None else int(status)


if __name__ == "__main__":
    sys.exit(main())
