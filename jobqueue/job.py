"""What one batch job is: validated options, worker lifetimes, and its rendered script.

Theory of operation
-------------------
:func:`make_spec` checks every option a cluster takes (a bad value raises a
``ValueError``/``TypeError`` naming the option and what it accepts) and
freezes them in a :class:`JobSpec`.  A job runs ``processes`` workers with
``cores // processes`` threads and ``memory // processes`` bytes each, through
``python -m cluster worker``, named ``<job_name>-<job id>`` (or
``-<job id>-<i>`` with several processes) from the batch system's job-id
variable at run time, so that the cluster can tell which job a worker
belongs to.

Walltime-aware lifetimes (:func:`plan_lifetime`): a job that the batch system
kills at its walltime loses the data its workers hold.  So, unless told
otherwise, each worker gets ``--lifetime`` and ``--lifetime-stagger`` such
that it retires gracefully -- its unique data copied to other workers first
-- before the walltime ``W`` ends:

- margin ``M = min(W/4, max(30s, min(5min, W/10)))``: time kept free at the
  end of the job for the last retirement to finish;
- stagger ``S = M/2``, so that a job's workers (and jobs started together)
  do not all leave at once;
- lifetime ``L = W - M - S``: each worker retires between ``W - M - 2S`` and
  ``W - M`` after it started.

For the default ``walltime="00:30:00"``: ``M = 3min``, ``S = 90s``, workers
retire between minute 24 and 27.  For ``"01:00:00"``: 5 min, 150 s, between
minute 50 and 55.  For ``"00:02:00"``: 30 s, 15 s, between second 60 and 90.
``lifetime=``, ``lifetime_stagger=`` and ``lifetime_margin=`` set these
values; ``lifetime=None`` turns lifetimes off; a ``--lifetime`` in
``worker_extra_args`` is the user's own and also turns ours off.  The cluster
counts a job as *ending* from ``L - S - max(S, L/10)`` after its first worker
started (45 s into a 2-minute job, 44.75 min into a 1-hour one), so that
``scale``/``adapt`` submit its replacement before its workers leave and
their data has somewhere to go.

Rendering (:func:`render_script`) uses jinja2 with ``StrictUndefined``: a
value the template uses but nobody set raises :class:`TemplateError` naming
it.  Our templates are package data of :mod:`cluster.templates`; a user template
given by path may ``{% extends "slurm.sh.j2" %}`` or stand alone.
"""

from __future__ import annotations

import math
import os
import re
import shlex
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import cluster.templates as shipped_templates
import jinja2
from cluster.runtime.process import python_command

from .errors import TemplateError
from .units import exact_size, parse_duration, parse_memory, parse_walltime, seconds_text

#: ``job_name`` must look like this: safe in a shell word, a directive and a worker name.
JOB_NAME_PATTERN = re.compile(r"^[A-Za-z][A-Za-z0-9_.-]*$")

#: Default ``job_name`` (dask-jobqueue's is ``dask-worker``).
DEFAULT_JOB_NAME = "hpc-worker"

#: Default ``walltime``, as in dask-jobqueue.
DEFAULT_WALLTIME = "00:30:00"

_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


@dataclass(frozen=True)
class Lifetime:
    """When each worker of a job retires (seconds), and when the job counts as ending.

    Attributes:
        lifetime: ``--lifetime`` of each worker (``None``: never retires by itself).
        stagger: ``--lifetime-stagger``: the lifetime varies by up to this much either way.
        margin: seconds kept free before the walltime (0 when not walltime-derived).
        ours: we add ``--lifetime`` to the worker command (not the user's own arguments).
    """

    lifetime: float | None = None
    stagger: float = 0.0
    margin: float = 0.0
    ours: bool = False

    @property
    def ending_after(self) -> float | None:
        """Seconds after a job's first worker started from which it counts as ending.

        The earliest a worker can retire (``lifetime - stagger``) less a lead
        of one stagger (at least 10% of the lifetime) for the replacement job
        to start.
        """
        if self.lifetime is None:
            return None
        lead = max(self.stagger, 0.1 * self.lifetime)
        return max(0.0, self.lifetime - self.stagger - lead)


def default_margin(walltime: float) -> float:
    """``min(W/4, max(30s, min(5min, W/10)))``: see the module docstring."""
    return min(walltime / 4, max(30.0, min(300.0, walltime / 10)))


def _user_lifetime(args: Sequence[str]) -> tuple[float | None, float]:
    """``--lifetime``/``--lifetime-stagger`` found in ``worker_extra_args`` (seconds)."""
    found: dict[str, float] = {}
    for i, arg in enumerate(args):
        for name in ("--lifetime", "--lifetime-stagger"):
            value = None
            if arg == name and i + 1 < len(args):
                value = args[i + 1]
            elif arg.startswith(name + "="):
                value = arg.split("=", 1)[1]
            if value is not None:
                found[name] = parse_duration(value, f"worker_extra_args {name}")
    return found.get("--lifetime"), found.get("--lifetime-stagger", 0.0)


def plan_lifetime(walltime: float | None, lifetime: Any = "auto", stagger: Any = "auto",
                  margin: Any = "auto", worker_extra_args: Sequence[str] = ()) -> Lifetime:
    """Workers' lifetime from the walltime and the options (see the module docstring).

    Raises:
        ValueError: a value is not a duration, or the lifetime would not fit
            in the walltime; the message names the option.
    """
    user_lifetime, user_stagger = _user_lifetime(worker_extra_args)
    if user_lifetime is not None:
        return Lifetime(user_lifetime, user_stagger, 0.0, ours=False)
    if lifetime is None or lifetime is False:
        return Lifetime()
    explicit = lifetime != "auto"
    if explicit:
        life = parse_duration(lifetime, "lifetime")
        if life <= 0:
            raise ValueError(f"lifetime={lifetime!r}: must be above zero (or None for no lifetime)")
        stag = 0.0 if stagger == "auto" else parse_duration(stagger, "lifetime_stagger")
        if stag >= life:
            raise ValueError(f"lifetime_stagger={stagger!r} must be less than lifetime={lifetime!r}")
        return Lifetime(life, stag, 0.0, ours=True)
    if walltime is None:
        return Lifetime()
    m = default_margin(walltime) if margin == "auto" else parse_duration(margin, "lifetime_margin")
    s = m / 2 if stagger == "auto" else parse_duration(stagger, "lifetime_stagger")
    life = walltime - m - s
    if life - s <= 0:
        raise ValueError(
            f"lifetime_margin={margin!r} and lifetime_stagger={stagger!r} leave no time to work in "
            f"a walltime of {walltime:g}s (workers would retire after {life - s:g}s); give smaller "
            "values, a longer walltime, or lifetime=None")
    return Lifetime(life, s, m, ours=True)


@dataclass(frozen=True)
class JobSpec:
    """The validated options of a cluster's jobs (see :class:`~cluster.jobqueue.core.JobQueueCluster`)."""

    cores: int
    memory: int
    processes: int
    queue: str | None = None
    account: str | None = None
    walltime: int | None = None
    job_name: str = DEFAULT_JOB_NAME
    job_extra_directives: tuple[str, ...] = ()
    job_directives_skip: tuple[str, ...] = ()
    job_script_prologue: tuple[str, ...] = ()
    job_script_epilogue: tuple[str, ...] = ()
    interface: str | None = None
    local_directory: str | None = None
    log_directory: str | None = None
    worker_extra_args: tuple[str, ...] = ()
    python: str = sys.executable
    shebang: str = "#!/usr/bin/env bash"
    env: Mapping[str, str] = field(default_factory=dict)
    nanny: bool = True
    death_timeout: float | None = 180.0
    lifetime: Lifetime = Lifetime()
    template: str | None = None

    @property
    def nthreads(self) -> int:
        """Threads per worker: ``cores // processes``."""
        return max(1, self.cores // self.processes)

    @property
    def worker_memory(self) -> int:
        """Memory limit per worker in bytes: ``memory // processes``."""
        return self.memory // self.processes

    def worker_names(self, job_id: str) -> list[str]:
        """The names the workers of job ``job_id`` register with."""
        base = f"{self.job_name}-{job_id}"
        return [base] if self.processes == 1 else [f"{base}-{i}" for i in range(self.processes)]


def _strings(value: Any, option: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        raise TypeError(f"{option}={value!r}: expected a list of strings, not one string "
                        f"(write [{value!r}])")
    try:
        items = tuple(value)
    except TypeError:
        raise TypeError(f"{option}={value!r}: expected a list of strings") from None
    for item in items:
        if not isinstance(item, str):
            raise TypeError(f"{option}: expected a list of strings, found {item!r}")
    return items


def _one_line(value: Any, option: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, (str, os.PathLike)):
        raise TypeError(f"{option}={value!r}: expected a string")
    text = os.fspath(value)
    if not text or "\n" in text or "\r" in text:
        raise ValueError(f"{option}={value!r}: expected a non-empty string on one line")
    return text


def extra_directives(value: Any, prefix: str,
                     option: str = "job_extra_directives") -> tuple[str, ...]:
    """Checked extra directive lines, each starting with ``prefix`` unless it starts with ``#``.

    Raises:
        TypeError: not a list of strings (named ``option``).
        ValueError: a line is empty or spans several lines.
    """
    lines = tuple(d if d.lstrip().startswith("#") else f"{prefix} {d}"
                  for d in _strings(value, option))
    for d in lines:
        _one_line(d, option)
    return lines


def environment_variables(value: Any, option: str = "env") -> dict[str, str]:
    """``{name: value}`` checked for the job script's ``export`` lines (values made strings).

    Raises:
        TypeError: not a mapping.
        ValueError: a name that is not a valid environment variable name.
    """
    env_map: dict[str, str] = {}
    if value is None:
        return env_map
    if not isinstance(value, Mapping):
        raise TypeError(f"{option}={value!r}: expected a dict of environment variables")
    for k, v in value.items():
        if not isinstance(k, str) or not _ENV_NAME.match(k):
            raise ValueError(f"{option}: {k!r} is not a valid environment variable name")
        env_map[k] = str(v)
    return env_map


def _positive_int(value: Any, option: str, required: str = "") -> int:
    if value is None:
        raise ValueError(f"{option} is required{required}")
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{option}={value!r}: expected a positive integer")
    return value


def make_spec(*, cores: Any = None, memory: Any = None, processes: Any = None,
              queue: Any = None, account: Any = None, walltime: Any = DEFAULT_WALLTIME,
              job_name: Any = DEFAULT_JOB_NAME, job_extra_directives: Any = None,
              job_directives_skip: Any = None, job_script_prologue: Any = None,
              job_script_epilogue: Any = None, interface: Any = None, local_directory: Any = None,
              log_directory: Any = None, worker_extra_args: Any = None, python: Any = None,
              shebang: Any = "#!/usr/bin/env bash", env: Any = None, nanny: Any = True,
              death_timeout: Any = "180s", lifetime: Any = "auto", lifetime_stagger: Any = "auto",
              lifetime_margin: Any = "auto", template: Any = None,
              directive_prefix: str = "#SBATCH") -> JobSpec:
    """Check the job options and freeze them (see :class:`JobQueueCluster` for each).

    Raises:
        ValueError: a missing required option or a bad value, named in the message.
        TypeError: a value of the wrong type, named likewise.
    """
    hint = (": the cores and the memory of one job, e.g. cores=8, memory='16GB' "
            "(a job runs `processes` workers that share them)")
    missing = [n for n, v in (("cores", cores), ("memory", memory)) if v is None]
    if missing:
        raise ValueError(f"{' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} "
                         f"required{hint}")
    cores = _positive_int(cores, "cores")
    nbytes = parse_memory(memory, "memory")
    if processes is None:
        # As dask-jobqueue: about as many processes as threads per process.
        processes = max(1, math.isqrt(cores))
        while cores % processes:
            processes -= 1
    processes = _positive_int(processes, "processes")
    if processes > cores:
        raise ValueError(f"processes={processes} is more than cores={cores}: each worker needs "
                         "at least one core")
    if cores % processes:
        raise ValueError(f"cores={cores} is not a multiple of processes={processes}: each worker "
                         "gets cores // processes threads; choose values that divide evenly")
    if not isinstance(job_name, str) or not JOB_NAME_PATTERN.match(job_name):
        raise ValueError(f"job_name={job_name!r}: expected a letter followed by letters, digits, "
                         "'_', '.' or '-' (it names the job and its workers)")
    wall = None if walltime is None else parse_walltime(walltime, "walltime")
    extra_args = _strings(worker_extra_args, "worker_extra_args")
    extra = extra_directives(job_extra_directives, directive_prefix)
    env_map = environment_variables(env)
    if not isinstance(nanny, bool):
        raise TypeError(f"nanny={nanny!r}: expected True or False")
    if death_timeout is None:
        death = None
    else:
        death = parse_duration(death_timeout, "death_timeout")
    if template is not None:
        template = os.fspath(template)
        if not os.path.isfile(template):
            raise ValueError(f"template={template!r}: no such file")
    shebang = _one_line(shebang, "shebang")
    if not shebang.startswith("#!"):
        raise ValueError(f"shebang={shebang!r}: expected a line starting with '#!'")
    return JobSpec(
        cores=cores, memory=nbytes, processes=processes,
        queue=_one_line(queue, "queue"), account=_one_line(account, "account"),
        walltime=wall, job_name=job_name, job_extra_directives=extra,
        job_directives_skip=_strings(job_directives_skip, "job_directives_skip"),
        job_script_prologue=_strings(job_script_prologue, "job_script_prologue"),
        job_script_epilogue=_strings(job_script_epilogue, "job_script_epilogue"),
        interface=_one_line(interface, "interface"),
        local_directory=_one_line(local_directory, "local_directory"),
        log_directory=_one_line(log_directory, "log_directory"),
        worker_extra_args=extra_args,
        python=_one_line(python, "python") or sys.executable,
        shebang=shebang, env=env_map, nanny=nanny, death_timeout=death,
        lifetime=plan_lifetime(wall, lifetime, lifetime_stagger, lifetime_margin, extra_args),
        template=template,
    )


def worker_command(spec: JobSpec, scheduler_address: str, job_id: str,
                   credentials_file: str | None = None) -> str:
    """The shell line that starts the job's workers (one ``python -P -m cluster worker``).

    The worker name is ``<job_name>-<job_id>``, ``job_id`` a shell expression
    (``${SLURM_JOB_ID}``): the shell fills in the batch system's job id when
    the job runs.

    Args:
        spec: the job options.
        scheduler_address: where the workers connect.
        job_id: the shell expression of the job id (:meth:`BatchSystem.job_id_expression`).
        credentials_file: the path of the workers' TLS credentials file
            (``--tls-credentials``); only the path goes into the script.
    """
    # python_command: -P (or its bootstrap), so that the job's working directory --
    # often a shared project directory -- is not on the workers' sys.path.
    args = [*python_command("cluster", "worker", executable=spec.python), scheduler_address,
            "--nworkers", str(spec.processes), "--nthreads", str(spec.nthreads),
            "--memory-limit", exact_size(spec.worker_memory),
            "--nanny" if spec.nanny else "--no-nanny"]
    if spec.death_timeout is not None:
        args += ["--death-timeout", seconds_text(spec.death_timeout)]
    life = spec.lifetime
    if life.ours and life.lifetime is not None:
        args += ["--lifetime", seconds_text(life.lifetime)]
        if life.stagger:
            args += ["--lifetime-stagger", seconds_text(life.stagger)]
    if spec.local_directory is not None:
        args += ["--local-directory", spec.local_directory]
    if spec.interface is not None:
        args += ["--interface", spec.interface]
    if credentials_file is not None:
        args += ["--tls-credentials", credentials_file]
    # job_name matches JOB_NAME_PATTERN, so it needs no quoting inside double quotes.
    name = f'--name "{spec.job_name}-{job_id}"'
    return " ".join([shlex.join(args), name, *(shlex.quote(a) for a in spec.worker_extra_args)])


# ----------------------------------------------------------------------------- rendering


class _ShippedLoader(jinja2.BaseLoader):
    """Our templates, read from the installed :mod:`cluster.templates` package."""

    def get_source(self, environment: jinja2.Environment, name: str):
        try:
            text = shipped_templates.source(name)
        except FileNotFoundError:
            raise jinja2.TemplateNotFound(name) from None
        return text, None, lambda: True


_USER_PREFIX = "user:"


class _UserLoader(jinja2.BaseLoader):
    """The user's template, by the name ``user:<path>``."""

    def get_source(self, environment: jinja2.Environment, name: str):
        if not name.startswith(_USER_PREFIX):
            raise jinja2.TemplateNotFound(name)
        path = name[len(_USER_PREFIX):]
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except OSError:
            raise jinja2.TemplateNotFound(name) from None
        mtime = os.path.getmtime(path)
        return text, path, lambda: os.path.getmtime(path) == mtime


def skip_filter(prefix: str, skip: Sequence[str]) -> Callable[[str], str]:
    """A jinja2 filter dropping directive lines (starting with ``prefix``) that contain a skip string."""
    def skip_directives(text: str) -> str:
        if not skip:
            return text
        lines = text.splitlines(keepends=True)
        return "".join(line for line in lines
                       if not (line.lstrip().startswith(prefix) and any(s in line for s in skip)))
    return skip_directives


def environment(template: str | None, prefix: str, skip: Sequence[str]) -> jinja2.Environment:
    """The jinja2 environment for our templates and, if given, the user's template file."""
    loaders: list[jinja2.BaseLoader] = [_UserLoader(), _ShippedLoader()]
    if template is not None:
        # The user's template may include files that sit beside it.
        loaders.append(jinja2.FileSystemLoader(os.path.dirname(os.path.abspath(template))))
    env = jinja2.Environment(loader=jinja2.ChoiceLoader(loaders), undefined=jinja2.StrictUndefined,
                             trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True,
                             autoescape=False)
    env.filters["shquote"] = lambda v: shlex.quote(str(v))
    env.filters["skip_directives"] = skip_filter(prefix, skip)
    return env


_UNDEFINED = re.compile(r"'([^']+)' is undefined|has no attribute '([^']+)'")


def render_script(template_name: str, values: Mapping[str, Any], *, user_template: str | None = None,
                  prefix: str = "#SBATCH", skip: Sequence[str] = ()) -> str:
    """Render our template ``template_name`` (or ``user_template``, a path) with ``values``.

    Raises:
        TemplateError: a value the template uses is missing (named), or the
            template does not exist or does not parse.
    """
    env = environment(user_template, prefix, skip)
    name = f"{_USER_PREFIX}{os.path.abspath(user_template)}" if user_template else template_name
    shown = user_template or template_name
    try:
        return env.get_template(name).render(**values)
    except jinja2.UndefinedError as e:
        m = _UNDEFINED.search(str(e))
        missing = (m.group(1) or m.group(2)) if m else ""
        raise TemplateError(shown, missing, str(e)) from e
    except jinja2.TemplateSyntaxError as e:
        raise TemplateError(shown, "", f"{e.message} (line {e.lineno} of {e.name or shown})") from e
    except jinja2.TemplateNotFound as e:
        raise TemplateError(shown, "", f"template not found: {e.name}") from e


def common_values(spec: JobSpec, worker_line: str) -> dict[str, Any]:
    """Template values every batch system shares (each class adds its own)."""
    return {
        "shebang": spec.shebang,
        "job_name": spec.job_name,
        "queue": spec.queue,
        "account": spec.account,
        "log_directory": spec.log_directory,
        "cores": spec.cores,
        "processes": spec.processes,
        "nthreads": spec.nthreads,
        "memory": spec.memory,
        "worker_memory": spec.worker_memory,
        "job_extra_directives": list(spec.job_extra_directives),
        "env": dict(spec.env),
        "job_script_prologue": list(spec.job_script_prologue),
        "job_script_epilogue": list(spec.job_script_epilogue),
        "worker_command": worker_line,
    }


__all__ = [
    "DEFAULT_JOB_NAME",
    "DEFAULT_WALLTIME",
    "JobSpec",
    "Lifetime",
    "common_values",
    "default_margin",
    "environment_variables",
    "extra_directives",
    "make_spec",
    "plan_lifetime",
    "render_script",
    "worker_command",
]
