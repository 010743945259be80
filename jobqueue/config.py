"""A batch-queue cluster's options: from its arguments, the configuration, the built-in defaults.

Theory of operation
-------------------
Every option of :class:`~cluster.jobqueue.core.JobQueueCluster` that a
``jobqueue.yaml`` can set defaults to ``FROM_CONFIG``.  :func:`resolve_options`
fills those from the section ``jobqueue.<config_name>`` of the configuration
(:mod:`cluster.runtime.config`: our files and ``HPC_CLUSTER__JOBQUEUE__...`` variables,
then dask's ``jobqueue.yaml`` and ``DASK_JOBQUEUE__...`` variables), where
``config_name`` is the batch system's name (``slurm``, ``pbs``, ``sge``)
unless given (``SLURMCluster(config_name="gpu")`` reads ``jobqueue.gpu``, as
in dask-jobqueue).  What the section does not set takes the built-in default
of the system's own section (``runtime/config.yaml``).

Keys are the argument names with ``-`` for ``_``, and ``name`` for
``job_name``.  dask-jobqueue's old names (``extra``, ``env-extra``,
``job-extra``, ``header-skip``) are read for their new ones with a
:class:`~cluster.runtime.config.ConfigWarning`; ``project`` is SLURM's and PBS's old
name of ``account``.  A key of dask's file that this cluster cannot honour
(``worker-command``, LSF's ``ncpus``, a SLURM option under PBS, ...) is
warned about by name when it holds a value, and ignored.  A value that the
cluster then rejects raises the cluster's own ``ValueError``/``TypeError``,
with where the value was configured added to the message.

Also here: the checks of the options that are the cluster's own rather than
the job's (:func:`positive`, :func:`scheduler_options`, :func:`cluster_security`).
"""

from __future__ import annotations

import os
import uuid
import warnings
from collections.abc import Mapping
from typing import Any

from cluster.runtime.config import FROM_CONFIG, ConfigWarning, settings
from cluster.runtime.security import Security, resolve_security

from .credentials import credentials_directory
from .systems import BatchSystem
from .units import parse_duration

#: Configuration key -> argument of JobQueueCluster (the rest: '-' -> '_').
_KEY_TO_ARG = {"name": "job_name"}

#: Arguments of JobQueueCluster that the configuration can set.
CONFIGURABLE = (
    "cores", "memory", "processes", "queue", "account", "walltime", "job_name",
    "job_extra_directives", "job_directives_skip", "job_script_prologue", "job_script_epilogue",
    "interface", "local_directory", "log_directory", "shared_temp_directory",
    "worker_extra_args", "python", "shebang", "env", "nanny", "death_timeout", "lifetime",
    "lifetime_stagger", "lifetime_margin", "template", "scheduler_options", "status_interval",
    "command_timeout", "close_timeout",
)

#: dask-jobqueue's old key names -> the current ones.
DEPRECATED = {"extra": "worker-extra-args", "env-extra": "job-script-prologue",
              "job-extra": "job-extra-directives", "header-skip": "job-directives-skip"}

#: Keys whose null means "not set" (their argument has no use for None).
_NULL_IS_UNSET = frozenset({"name", "shebang", "nanny"})

#: dask-jobqueue's default worker command: the same as ours, so no warning for it.
_DASK_WORKER_COMMAND = "distributed.cli.dask_worker"


def _empty(value: Any) -> bool:
    return value is None or value == [] or value == {} or value == ""


def _arg(key: str) -> str:
    return _KEY_TO_ARG.get(key, key.replace("-", "_"))


def resolve_options(cluster: str, system: type[BatchSystem], config_name: str | None,
                    given: Mapping[str, Any], system_options: Mapping[str, Any]
                    ) -> tuple[dict[str, Any], dict[str, Any], dict[str, str]]:
    """The cluster's arguments with those left ``FROM_CONFIG`` filled in.

    Args:
        cluster: the class name, for messages (``"SLURMCluster"``).
        system: the batch system's class.
        config_name: the section ``jobqueue.<config_name>`` to read (default:
            the system's name).
        given: the arguments of :data:`CONFIGURABLE` (``FROM_CONFIG`` where not given).
        system_options: the system's own options given as arguments.

    Returns:
        ``(arguments, system options, sources)``: ``sources`` maps each argument
        taken from the configuration to ``"jobqueue.slurm.queue in <file>"``.

    Raises:
        ValueError: ``config_name`` names no section of the configuration.
        TypeError: ``config_name`` is not a string.
    """
    if config_name is not None and not isinstance(config_name, str):
        raise TypeError(f"config_name={config_name!r}: expected the name of a jobqueue.<name> "
                        "section of the configuration")
    name = (config_name or system.name).strip().lower().replace("_", "-")
    section = {k.rsplit(".", 1)[1]: s for k, s in settings(f"jobqueue.{name}.").items()}
    configured = {k: s for k, s in section.items() if not s.default}
    if config_name is not None and not section:
        found = sorted({k.split(".")[1] for k in settings("jobqueue.")})
        raise ValueError(f"config_name={config_name!r}: the configuration has no jobqueue.{name} "
                         f"section (it has: {', '.join(found)}); see docs/configuration.md")
    defaults = {k.rsplit(".", 1)[1]: s.value
                for k, s in settings(f"jobqueue.{system.name}.").items() if s.default}
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for key, s in configured.items():
        where = f"jobqueue.{name}.{key} in {s.source}"
        if key in DEPRECATED:
            new = DEPRECATED[key]
            if _empty(s.value) or new in configured:
                continue
            warnings.warn(f"{where}: {key!r} is dask-jobqueue's old name of {new!r}; "
                          f"using it as {new}", ConfigWarning, stacklevel=3)
            key = new
        if key == "project" and "project" not in system.options:
            if _empty(s.value) or "account" in configured:
                continue
            key = "account"  # the old name of account (SLURM; PBS's -A)
        if key in _NULL_IS_UNSET and s.value is None:
            continue
        arg = _arg(key)
        if arg in CONFIGURABLE or arg in system.options:
            values[arg] = s.value
            sources[arg] = where
        elif not _empty(s.value) and not (key == "worker-command"
                                          and s.value == _DASK_WORKER_COMMAND):
            warnings.warn(f"{where}: {cluster} cannot honour {key}={s.value!r} (no such option "
                          f"for {system.title}); ignored", ConfigWarning, stacklevel=3)
    args: dict[str, Any] = {}
    for arg in CONFIGURABLE:
        if given.get(arg, FROM_CONFIG) is not FROM_CONFIG:
            args[arg] = given[arg]
            sources.pop(arg, None)
        elif arg in values:
            args[arg] = values[arg]
        else:
            key = next((k for k in defaults if _arg(k) == arg), None)
            args[arg] = defaults.get(key) if key is not None else None
    own = dict(system_options)
    for arg in system.options:
        if arg in values and arg not in own:
            own[arg] = values[arg]
        else:
            sources.pop(arg, None)
    return args, own, sources


def explain(error: Exception, sources: Mapping[str, str]) -> Exception:
    """``error`` (a ValueError/TypeError) naming where the values it mentions were configured."""
    text = str(error)
    notes = [f"{arg} is {where}" for arg, where in sources.items() if arg in text]
    if not notes:
        return error
    return type(error)(f"{text} ({'; '.join(notes)})")


# ----------------------------------------------------------------------------- the cluster's own options


def positive(value: Any, option: str) -> float:
    """Seconds of a duration above zero.

    Raises:
        ValueError: naming ``option``.
    """
    seconds = parse_duration(value, option)
    if seconds <= 0:
        raise ValueError(f"{option}={value!r}: must be above zero")
    return seconds


def scheduler_options(options: Mapping[str, Any] | None, interface: str | None) -> dict:
    """Keyword arguments of the cluster's Scheduler (any port; the workers' interface by default).

    Raises:
        TypeError: not a mapping.
        ValueError: it holds ``security`` (the cluster's own argument).
    """
    if options is not None and not isinstance(options, Mapping):
        raise TypeError(f"scheduler_options={options!r}: expected a dict of Scheduler options")
    if options is not None and "security" in options:
        raise ValueError("scheduler_options: pass security= to the cluster itself (its "
                         "workers need the same credentials), not in scheduler_options")
    opts = {"port": 0, **(options or {})}
    if interface is not None and "host" not in opts and "interface" not in opts:
        opts["interface"] = interface  # as dask-jobqueue: the workers' network
    return opts


def cluster_security(security: Any, shared_temp_directory: Any, job_name: str
                     ) -> tuple[Security | None, str | None]:
    """The cluster's ``Security`` and the path of the workers' credentials file (or ``None``s).

    Raises:
        TypeError: ``shared_temp_directory`` is not a path.
        ValueError: a ``Security`` without the CA and both certificates.
    """
    if shared_temp_directory is not None and not isinstance(shared_temp_directory,
                                                            (str, os.PathLike)):
        raise TypeError(f"shared_temp_directory={shared_temp_directory!r}: expected a path")
    # Secure by default: we submit the workers ourselves, so we can hand them credentials.
    sec = resolve_security(security, default=True)
    if sec is None:
        return None, None
    missing = [f"a {role} certificate (tls_{role}_cert)"
               for role in ("scheduler", "worker") if not sec.has_tls(role)]
    if missing:
        raise ValueError(f"security={sec!r}: a batch-queue cluster needs a CA (tls_ca_file) "
                         f"and {' and '.join(missing)}; or pass security=None for fresh ones")
    name = f"{job_name}-{uuid.uuid4().hex[:12]}.credentials"
    return sec, os.path.join(credentials_directory(shared_temp_directory), name)


__all__ = ["CONFIGURABLE", "DEPRECATED", "cluster_security", "explain", "positive",
           "resolve_options", "scheduler_options"]
