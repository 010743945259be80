"""The one seam through which the batch-queue layer runs commands.

Theory of operation
-------------------
Every ``sbatch``/``squeue``/``scancel`` (or ``qsub``/``qstat``/``qdel``) call
goes through a *runner*: an async callable that takes an argv list and returns
a :class:`CommandResult`.  :func:`run_command` is the real one: it starts the
program with :func:`asyncio.create_subprocess_exec` (never a shell, so no
quoting bugs and no injection through job names or paths), feeds it optional
standard input, and kills it (its whole process group) if it outlives its
timeout.  A non-zero exit status is *not* an error at this level -- ``squeue``
and ``qstat`` exit non-zero for jobs that have left the system, and the caller
knows what each status means -- but a missing program and a timeout are:
:class:`~cluster.jobqueue.errors.CommandNotFoundError` and
:class:`~cluster.jobqueue.errors.CommandTimeoutError`.  :func:`check` turns a non-zero
status into the typed error the caller names (``SubmitError``, ...).

Clusters take ``runner=`` so that unit tests replace the seam with a fake that
records argv lists and answers with canned outputs, without any subprocess.

:func:`run_blocking` runs a runner to completion from synchronous code --
interpreter exit and garbage collection, where a cluster must still cancel its
jobs -- on a fresh event loop (in a helper thread when the calling thread
already runs one).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from collections.abc import Awaitable, Callable, Mapping, Sequence
from contextlib import suppress
from dataclasses import dataclass
from typing import Protocol

from .errors import CancelError, CommandError, CommandNotFoundError, CommandTimeoutError
from .plumbing import blocking

logger = logging.getLogger(__name__)

#: Seconds a batch command may run before it is killed, unless the caller says otherwise.
DEFAULT_TIMEOUT = 60.0


@dataclass(frozen=True, slots=True)
class CommandResult:
    """What a finished command returned.

    Attributes:
        argv: the command and its arguments.
        returncode: its exit status.
        stdout: standard output, decoded as UTF-8 (undecodable bytes replaced).
        stderr: standard error, decoded likewise.
    """

    argv: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str


class Runner(Protocol):
    """The seam: run ``argv`` (no shell) and return its result.

    Implementations raise :class:`CommandNotFoundError` and
    :class:`CommandTimeoutError`, and return (not raise) for any exit status.
    """

    def __call__(self, argv: Sequence[str], *, timeout: float = DEFAULT_TIMEOUT,
                 input: bytes | None = None,
                 env: Mapping[str, str] | None = None) -> Awaitable[CommandResult]: ...


def _decode(data: bytes | None) -> str:
    return (data or b"").decode("utf-8", errors="replace")


async def run_command(argv: Sequence[str], *, timeout: float = DEFAULT_TIMEOUT,
                      input: bytes | None = None,
                      env: Mapping[str, str] | None = None) -> CommandResult:
    """Run ``argv`` without a shell and return its exit status and output.

    Args:
        argv: the program and its arguments (``["sbatch", "/tmp/job.sh"]``).
        timeout: seconds before the command (its process group) is killed.
        input: bytes for its standard input (default: none, stdin is ``/dev/null``).
        env: its environment (default: this process's).

    Returns:
        The result, whatever the exit status.

    Raises:
        CommandNotFoundError: the program does not exist or cannot be executed.
        CommandTimeoutError: it ran longer than ``timeout`` and was killed.
        ValueError: ``argv`` is empty or not a list of strings.
    """
    if isinstance(argv, (str, bytes)) or not argv:
        raise ValueError(f"argv={argv!r}: expected a non-empty list of strings (no shell)")
    argv = tuple(os.fspath(a) if not isinstance(a, str) else a for a in argv)
    logger.debug("running %s", argv)
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.PIPE if input is not None else asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            env=dict(env) if env is not None else None,
            # Its own process group, so that a timeout kills what it started too.
            start_new_session=True,
        )
    except (FileNotFoundError, PermissionError, NotADirectoryError) as e:
        raise CommandNotFoundError(argv, reason=str(e)) from e
    try:
        out, err = await asyncio.wait_for(proc.communicate(input), timeout)
    except (asyncio.TimeoutError, asyncio.CancelledError) as e:
        _kill_group(proc.pid)
        with suppress(Exception):
            out, err = await asyncio.wait_for(proc.communicate(), 5)
        if isinstance(e, asyncio.CancelledError):
            raise
        raise CommandTimeoutError(argv, reason=f"timed out after {timeout:g}s") from None
    result = CommandResult(argv, proc.returncode if proc.returncode is not None else -1,
                           _decode(out), _decode(err))
    logger.debug("%s exited with %s", argv[0], result.returncode)
    return result


def _kill_group(pid: int) -> None:
    with suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


def check(result: CommandResult, error: type[CommandError] = CommandError) -> CommandResult:
    """Return ``result`` if its command exited with status 0.

    Raises:
        CommandError: (the class given as ``error``) carrying argv, exit code and output.
    """
    if result.returncode != 0:
        raise error(result.argv, result.returncode, result.stdout, result.stderr)
    return result


def run_blocking(runner: Runner | Callable[..., Awaitable[CommandResult]], argv: Sequence[str],
                 timeout: float = DEFAULT_TIMEOUT) -> CommandResult:
    """Run ``runner(argv)`` to completion from synchronous code.

    Used where no event loop of ours can be relied on: interpreter exit and
    finalizers of garbage-collected clusters.  Uses a fresh event loop, in a
    helper thread if this thread is already running one
    (:func:`cluster.jobqueue.plumbing.blocking`).

    Raises:
        whatever the runner raised; CommandTimeoutError if it never returned.
    """
    try:
        return blocking(lambda: runner(argv, timeout=timeout), timeout + 10)
    except TimeoutError as e:
        if isinstance(e, CommandTimeoutError):
            raise
        raise CommandTimeoutError(tuple(argv), reason=f"did not finish within {timeout + 10:g}s") from None


def cancel_leftovers(runner: Runner, cancel_argv: tuple[str, ...], ids: set[str],
                     system: str, timeout: float) -> None:
    """Finalizer of a cluster: cancel the jobs it left (garbage collection, interpreter exit)."""
    if not ids:
        return
    argv = [*cancel_argv, *sorted(ids)]
    try:
        result = run_blocking(runner, argv, timeout)
    except Exception as e:  # nothing to raise to at exit
        logger.error("could not cancel %s jobs %s left by a cluster: %s", system, sorted(ids), e)
        return
    if result.returncode != 0:
        logger.warning("cancelling %s jobs %s left by a cluster: %s", system, sorted(ids),
                       CancelError(result.argv, result.returncode, result.stdout, result.stderr))
    else:
        logger.info("cancelled %s jobs %s left by a cluster that was not closed", system, sorted(ids))
    ids.clear()


__all__ = ["DEFAULT_TIMEOUT", "CommandResult", "Runner", "cancel_leftovers", "check",
           "run_blocking", "run_command"]
