"""Exceptions of the batch-queue layer: one root, typed subclasses, all picklable.

Tree (``ClusterError`` is the runtime's root, :mod:`cluster.runtime.errors`)::

    ClusterError
    └── JobQueueError                 root of everything jobqueue raises on purpose
        ├── CommandError              a batch command (sbatch, squeue, qdel, ...) failed
        │   ├── SubmitError           submitting a job failed (sbatch/qsub exit status != 0)
        │   ├── CancelError           cancelling jobs failed (scancel/qdel)
        │   ├── StatusError           asking for job states failed (squeue/qstat)
        │   ├── CommandNotFoundError  the command is not installed (also FileNotFoundError)
        │   └── CommandTimeoutError   the command did not finish in time (also TimeoutError)
        ├── JobIdNotFoundError        the submit command succeeded but printed no job id
        └── TemplateError             a job-script template could not be rendered (names the value)

Every :class:`CommandError` carries the command's ``argv``, its exit code
(``None`` when it never ran or did not finish), ``stdout`` and ``stderr``, so
that the message shows what the batch system said.  Lower-layer exceptions
(``OSError``, jinja2's ``UndefinedError``) are translated at the boundary and
chained with ``from``.  Like every error of this project these pickle with all
their fields (``ClusterError.__reduce__`` replays ``args``; a test round-trips
each one).
"""

from __future__ import annotations

import shlex
from collections.abc import Sequence

from cluster.runtime.errors import ClusterError

#: Characters of a command's output kept in an error message (the fields keep all of it).
_MESSAGE_OUTPUT_LIMIT = 2000


def _tail(text: str) -> str:
    text = text.strip()
    if len(text) > _MESSAGE_OUTPUT_LIMIT:
        return "..." + text[-_MESSAGE_OUTPUT_LIMIT:]
    return text


class JobQueueError(ClusterError):
    """Root of every exception the batch-queue layer raises on purpose."""


class CommandError(JobQueueError):
    """A batch-system command failed.

    Args:
        argv: the command and its arguments, as run (no shell).
        returncode: its exit status; ``None`` if it did not run or did not finish.
        stdout: what it printed on standard output (decoded).
        stderr: what it printed on standard error (decoded).
        reason: a short explanation of our own (e.g. ``"timed out after 30s"``).
    """

    def __init__(self, argv: Sequence[str], returncode: int | None = None, stdout: str = "",
                 stderr: str = "", reason: str = ""):
        argv = tuple(str(a) for a in argv)
        super().__init__(argv, returncode, stdout, stderr, reason)
        # OSError (a base of two subclasses) keeps only some of its args: set them all.
        self.args = (argv, returncode, stdout, stderr, reason)
        self.argv = argv
        self.returncode = returncode
        self.stdout = stdout
        self.stderr = stderr
        self.reason = reason

    @property
    def command(self) -> str:
        """The command line, quoted as a shell would need it (for messages and logs)."""
        return shlex.join(self.argv)

    def __str__(self) -> str:
        what = self.reason or (f"exited with status {self.returncode}"
                               if self.returncode is not None else "failed")
        parts = [f"command {self.command!r} {what}"]
        if self.stderr.strip():
            parts.append(f"stderr: {_tail(self.stderr)}")
        if self.stdout.strip():
            parts.append(f"stdout: {_tail(self.stdout)}")
        return "; ".join(parts)


class SubmitError(CommandError):
    """Submitting a job failed: ``sbatch``/``qsub`` exited with a non-zero status."""


class CancelError(CommandError):
    """Cancelling jobs failed: ``scancel``/``qdel`` exited with a non-zero status."""


class StatusError(CommandError):
    """Asking for job states failed: ``squeue``/``qstat`` gave nothing we could read."""


class CommandNotFoundError(CommandError, FileNotFoundError):
    """The batch command is not installed (not on ``PATH``)."""

    def __str__(self) -> str:
        name = self.argv[0] if self.argv else "?"
        return (f"command {name!r} not found (running {self.command!r}): is the batch system's "
                "client installed and on PATH?" + (f" {self.reason}" if self.reason else ""))


class CommandTimeoutError(CommandError, TimeoutError):
    """The batch command did not finish in time (it was killed)."""


class JobIdNotFoundError(JobQueueError):
    """The submit command succeeded but its output held no job id.

    Args:
        argv: the submit command.
        stdout: what it printed.
        pattern: the regular expression that found nothing.
    """

    def __init__(self, argv: Sequence[str], stdout: str, pattern: str):
        argv = tuple(str(a) for a in argv)
        super().__init__(argv, stdout, pattern)
        self.argv = argv
        self.stdout = stdout
        self.pattern = pattern

    def __str__(self) -> str:
        return (f"no job id in the output of {shlex.join(self.argv)!r} "
                f"(looked for {self.pattern!r}): {_tail(self.stdout)!r}")


class TemplateError(JobQueueError, ValueError):
    """A job-script template could not be rendered.

    Args:
        template: the template's name or path.
        name: the missing or bad value (e.g. ``"queue"``), or ``""`` if unknown.
        message: what jinja2 said.
    """

    def __init__(self, template: str, name: str = "", message: str = ""):
        super().__init__(template, name, message)
        self.template = template
        self.name = name
        self.message = message

    def __str__(self) -> str:
        if self.name:
            return (f"template {self.template!r} uses {self.name!r}, which has no value "
                    f"({self.message})" if self.message else
                    f"template {self.template!r} uses {self.name!r}, which has no value")
        return f"template {self.template!r} could not be rendered: {self.message}"


__all__ = [
    "CancelError",
    "CommandError",
    "CommandNotFoundError",
    "CommandTimeoutError",
    "JobIdNotFoundError",
    "JobQueueError",
    "StatusError",
    "SubmitError",
    "TemplateError",
]
