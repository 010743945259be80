"""Configuration: files and environment variables, ours first, dask's as a fallback.

Constructors read their defaults through :func:`setting`: an argument given
wins; otherwise the configured value, which comes from the highest of these
layers that sets it (highest first):

1. ``config.set(...)`` in this process (donfig's context manager);
2. ``HPC_CLUSTER__SECTION__KEY`` environment variables
   (``HPC_CLUSTER__WORKER__MEMORY__TARGET=0.5``);
3. our YAML files: ``$HPC_CLUSTER_CONFIG`` (a file or a directory), then
   ``~/.config/hpc-cluster/``, ``<sys.prefix>/etc/hpc-cluster/``,
   ``/etc/hpc-cluster/`` (or ``$HPC_CLUSTER_ROOT_CONFIG``); in one directory
   the files are read in name order, a later one winning;
4. ``DASK_*`` environment variables, for the dask keys we implement
   (:data:`DASK_KEYS`, and ``jobqueue.<name>.*``);
5. dask's YAML files (``$DASK_CONFIG``, ``~/.config/dask/``,
   ``<sys.prefix>/etc/dask/``, ``/etc/dask/`` or ``$DASK_ROOT_CONFIG``), same keys;
6. the built-in defaults, ``config.yaml`` next to this module, which lists
   and explains every key.

(The command lines put their flags and ``CLUSTER_<OPTION>`` variables above
all of these by passing them as constructor arguments.)

Our own files and variables are checked when they are read: a key we do not
know is warned about (:class:`ConfigWarning`, naming the file and the nearest
known keys: typos are the usual bug), a value of the wrong type is a
:class:`ConfigError` naming the file, the key and the accepted values.
dask's files hold many keys we do not implement; those are ignored, except
``jobqueue.<name>.*`` keys that a batch-queue cluster then uses (see
:mod:`cluster.jobqueue.config`).

donfig (dask's configuration engine as a library) reads the files and the
variables (``collect_yaml``, ``collect_env``: the same parsing as dask's) and
holds the merged result (``get``, ``set``); this module adds the layers'
order, the checks and where each value came from (:func:`settings`,
``python -m cluster config``).  Everything is read on first use and again
after :func:`refresh`; each process reads its own (worker processes read the
same files and inherit the variables, but not a parent's ``config.set``).
"""

from __future__ import annotations

import difflib
import os
import sys
import threading
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import donfig
import yaml
from donfig.config_obj import collect_env, collect_yaml

from .utils import parse_bytes, parse_timedelta

#: Prefix of our environment variables: ``HPC_CLUSTER__WORKER__MEMORY__TARGET``.
ENV_PREFIX = "HPC_CLUSTER__"
#: An extra configuration file or directory, read after (above) the others.
ENV_CONFIG = "HPC_CLUSTER_CONFIG"
#: Replaces ``/etc/hpc-cluster``.
ENV_ROOT_CONFIG = "HPC_CLUSTER_ROOT_CONFIG"
#: dask's equivalents, read as a fallback.
DASK_PREFIX, DASK_CONFIG, DASK_ROOT_CONFIG = "DASK_", "DASK_CONFIG", "DASK_ROOT_CONFIG"

DEFAULTS_FILE = os.path.join(os.path.dirname(__file__), "config.yaml")


class ConfigError(ValueError):
    """A configured value of the wrong type; the message names the source, the key and the accepted values."""


class ConfigWarning(UserWarning):
    """A configuration key we do not know (or cannot honour), with where it was set."""


class _FromConfig:
    """The default of a constructor argument that is read from the configuration."""

    _instance: _FromConfig | None = None

    def __new__(cls) -> _FromConfig:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "<from config>"

    def __reduce__(self) -> str:
        return "FROM_CONFIG"  # pickles as this module's singleton


#: Default of constructor arguments whose value comes from the configuration.
FROM_CONFIG = _FromConfig()


# ----------------------------------------------------------------------------- value kinds


@dataclass(frozen=True)
class Kind:
    """What a key accepts: ``check(value)`` is true for a good value; ``accepted`` says it in words."""

    accepted: str
    check: Callable[[Any], bool]


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _parses(parse: Callable[[Any], Any]) -> Callable[[Any], bool]:
    def check(v: Any) -> bool:
        try:
            value = parse(v)
        except (ValueError, TypeError):
            return False
        return value is None or value >= 0
    return check


def _duration(v: Any) -> bool:
    return (isinstance(v, str) or _number(v)) and _parses(parse_timedelta)(v)


def _strings(v: Any) -> bool:
    return v is None or (isinstance(v, list) and all(isinstance(x, str) for x in v))


FRACTION = Kind("a fraction in (0, 1], or false/null for off",
                lambda v: v is None or v is False or (_number(v) and 0 < v <= 1))
DURATION_OR_NULL = Kind("a duration like 30s, 5m, '1 hour' or 01:00:00, or null for never",
                        lambda v: v is None or _duration(v))
DURATION = Kind("a duration like 5s, 1m or 01:00:00", _duration)
NON_NEGATIVE_INT = Kind("a non-negative integer",
                        lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0)
POSITIVE_INT = Kind("a positive integer, or null",
                    lambda v: v is None or (isinstance(v, int) and not isinstance(v, bool) and v > 0))
SIZE = Kind("a size like 16GB or 8GiB, or a number of bytes, or null",
            lambda v: v is None or ((isinstance(v, str) or _number(v)) and _parses(parse_bytes)(v)))
TEXT = Kind("a string, or null", lambda v: v is None or isinstance(v, str))
TEXTS = Kind("a list of strings (one string: ['...']), or null", _strings)
MAPPING = Kind("a mapping (key: value lines), or null", lambda v: v is None or isinstance(v, dict))
BOOLEAN = Kind("true or false", lambda v: isinstance(v, bool))
WALLTIME = Kind("a duration like '01:00:00', '1-00:00:00' or '90m', or null",
                lambda v: v is None or (isinstance(v, str) and _duration(v)))
AUTO_DURATION = Kind("auto, a duration like 50m, or null",
                     lambda v: v is None or v == "auto" or _duration(v))

#: Every key of ours outside ``jobqueue`` and what it accepts.
SCHEMA: dict[str, Kind] = {
    "worker.memory.target": FRACTION,
    "worker.memory.spill": FRACTION,
    "worker.memory.pause": FRACTION,
    "worker.memory.terminate": FRACTION,
    "scheduler.allowed-failures": NON_NEGATIVE_INT,
    "scheduler.worker-ttl": DURATION_OR_NULL,
    "scheduler.idle-timeout": DURATION_OR_NULL,
}

#: The keys of a ``jobqueue.<name>`` section (any name) and what they accept.
JOBQUEUE_SCHEMA: dict[str, Kind] = {
    "cores": POSITIVE_INT, "memory": SIZE, "processes": POSITIVE_INT, "queue": TEXT,
    "account": TEXT, "walltime": WALLTIME, "name": TEXT, "job-extra-directives": TEXTS,
    "job-directives-skip": TEXTS, "job-script-prologue": TEXTS, "job-script-epilogue": TEXTS,
    "interface": TEXT, "local-directory": TEXT, "log-directory": TEXT,
    "shared-temp-directory": TEXT, "worker-extra-args": TEXTS, "python": TEXT, "shebang": TEXT,
    "env": MAPPING, "nanny": BOOLEAN, "death-timeout": DURATION_OR_NULL,
    "lifetime": AUTO_DURATION, "lifetime-stagger": AUTO_DURATION,
    "lifetime-margin": AUTO_DURATION, "template": TEXT, "scheduler-options": MAPPING,
    "status-interval": DURATION, "command-timeout": DURATION, "close-timeout": DURATION,
    # the batch systems' own options
    "job-cpu": POSITIVE_INT, "job-mem": SIZE, "project": TEXT, "resource-spec": TEXT,
    "parallel-environment": TEXT,
}

#: dask's keys that we implement, and ours they stand for (``jobqueue.*`` maps to itself).
DASK_KEYS: dict[str, str] = {
    "distributed.worker.memory.target": "worker.memory.target",
    "distributed.worker.memory.spill": "worker.memory.spill",
    "distributed.worker.memory.pause": "worker.memory.pause",
    "distributed.worker.memory.terminate": "worker.memory.terminate",
    "distributed.scheduler.allowed-failures": "scheduler.allowed-failures",
    "distributed.scheduler.worker-ttl": "scheduler.worker-ttl",
    "distributed.scheduler.idle-timeout": "scheduler.idle-timeout",
}


def kind_of(key: str) -> Kind | None:
    """What ``key`` (hyphenated, dotted) accepts, or ``None`` for a key we do not know."""
    if key in SCHEMA:
        return SCHEMA[key]
    parts = key.split(".")
    if len(parts) == 3 and parts[0] == "jobqueue":
        return JOBQUEUE_SCHEMA.get(parts[2])
    return None


def _is_leaf(key: str) -> bool:
    parts = key.split(".")
    return key in SCHEMA or (len(parts) == 3 and parts[0] == "jobqueue")


def _norm(key: Any) -> str:
    return str(key).strip().lower().replace("_", "-")


def flatten(tree: Mapping[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    """``("worker.memory.target", 0.6)`` pairs of a nested mapping, keys hyphenated.

    Mappings under a key that holds a mapping as its value (``scheduler-options``,
    ``env``) stay whole, with their keys as written.
    """
    for k, v in tree.items():
        key = prefix + _norm(k)
        if isinstance(v, Mapping) and not _is_leaf(key):
            yield from flatten(v, key + ".")
        else:
            yield key, v


def nest(flat: Mapping[str, Any]) -> dict[str, Any]:
    """The nested mapping of ``{"a.b": 1}`` pairs."""
    out: dict[str, Any] = {}
    for key, value in flat.items():
        *parents, last = key.split(".")
        d = out
        for p in parents:
            d = d.setdefault(p, {})
        d[last] = value
    return out


# ----------------------------------------------------------------------------- sources


@dataclass(frozen=True)
class Setting:
    """One configured value and where it came from (a file path, a variable, ``default``)."""

    value: Any
    source: str
    #: True for the built-in defaults (``config.yaml``).
    default: bool = False


def our_paths(environ: Mapping[str, str] | None = None) -> list[str]:
    """Our configuration files and directories, lowest precedence first."""
    env = os.environ if environ is None else environ
    paths = [env.get(ENV_ROOT_CONFIG, "/etc/hpc-cluster"),
             os.path.join(sys.prefix, "etc", "hpc-cluster"),
             os.path.join(os.path.expanduser("~"), ".config", "hpc-cluster")]
    if env.get(ENV_CONFIG):
        paths.append(env[ENV_CONFIG])
    return list(dict.fromkeys(paths))


def dask_paths(environ: Mapping[str, str] | None = None) -> list[str]:
    """dask's configuration files and directories (as dask searches them), lowest first."""
    env = os.environ if environ is None else environ
    paths = [env.get(DASK_ROOT_CONFIG, "/etc/dask"), os.path.join(sys.prefix, "etc", "dask"),
             os.path.join(os.path.expanduser("~"), ".config", "dask")]
    if env.get(DASK_CONFIG):
        paths.append(env[DASK_CONFIG])
    return list(dict.fromkeys(paths))


def config_files(paths: list[str]) -> list[str]:
    """The YAML/JSON files of ``paths`` (a directory's in name order), as donfig reads them."""
    out: list[str] = []
    for path in paths:
        if os.path.isdir(path):
            try:
                names = sorted(os.listdir(path))
            except OSError:
                continue
            out += [os.path.join(path, n) for n in names
                    if os.path.splitext(n)[1].lower() in (".yaml", ".yml", ".json")]
        elif os.path.exists(path):
            out.append(path)
    return out


def _read(path: str) -> dict:
    try:
        loaded = collect_yaml([path])
    except ValueError as e:  # donfig's message names the file
        raise ConfigError(str(e)) from None
    return loaded[0] if loaded else {}


_WORDS = {"null": None, "none": None, "~": None, "false": False, "true": True}


def _env_value(key: str, value: Any) -> Any:
    """dask's parsing (a Python literal, else the text), plus YAML's null/true/false for non-text keys."""
    kind = kind_of(key)
    if isinstance(value, str) and kind not in (None, TEXT, TEXTS) and value.lower() in _WORDS:
        return _WORDS[value.lower()]
    return value


def _env(prefix: str, environ: Mapping[str, str], skip: tuple[str, ...] = ()
         ) -> Iterator[tuple[str, Any, str]]:
    for name in sorted(environ):
        if not name.startswith(prefix) or name in skip or "INTERNAL_INHERIT_CONFIG" in name:
            continue
        for key, value in flatten(collect_env(prefix, env={name: environ[name]})):
            yield key, _env_value(key, value), name


def _check(key: str, value: Any, source: str, warn_unknown: bool) -> bool:
    """Whether ``key`` is ours; raise for a value of the wrong type; warn for an unknown key."""
    kind = kind_of(key)
    if kind is None:
        if warn_unknown:
            known = list(SCHEMA)
            if key.startswith("jobqueue.") and key.count(".") == 2:
                known += [f"jobqueue.{key.split('.')[1]}.{k}" for k in JOBQUEUE_SCHEMA]
            near = difflib.get_close_matches(key, known, n=2)
            hint = f" (did you mean {' or '.join(near)}?)" if near else ""
            if key in DASK_KEYS:  # dask's name in our file
                hint = (f" (dask's name of {DASK_KEYS[key]}: write that here, or keep dask's "
                        "keys in dask's files)")
            warnings.warn(f"{source}: unknown configuration key {key!r}, ignored{hint}",
                          ConfigWarning, stacklevel=2)
        return False
    if not kind.check(value):
        raise ConfigError(f"{source}: {key}={value!r}: expected {kind.accepted}")
    return True


class Configuration:
    """The layers (see the module docstring), merged in a donfig ``Config``, read on first use."""

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._layers: dict[str, Setting] | None = None
        self._donfig: donfig.Config | None = None

    def refresh(self, environ: Mapping[str, str] | None = None) -> None:
        """Read every file and variable again (``environ``: instead of ``os.environ``).

        Raises:
            ConfigError: a value of the wrong type (file, key, accepted values).
        """
        env = os.environ if environ is None else environ
        with open(DEFAULTS_FILE, encoding="utf-8") as f:
            defaults = yaml.safe_load(f)
        flat: dict[str, Setting] = {k: Setting(v, "default", True) for k, v in flatten(defaults)}
        for path in config_files(dask_paths(env)):
            self._dask(flat, ((k, v, path) for k, v in flatten(_read(path))))
        self._dask(flat, ((k, v, f"${name}")
                          for k, v, name in _env(DASK_PREFIX, env, (DASK_CONFIG, DASK_ROOT_CONFIG))))
        for path in config_files(our_paths(env)):
            for key, value in flatten(_read(path)):
                if _check(key, value, path, warn_unknown=True):
                    flat[key] = Setting(value, path)
        for key, value, name in _env(ENV_PREFIX, env):
            if _check(key, value, f"environment variable {name}", warn_unknown=True):
                flat[key] = Setting(value, f"${name}")
        cfg = donfig.Config("hpc-cluster", defaults=[nest({k: s.value for k, s in flat.items()})],
                            paths=[], env={})
        with self._lock:
            self._layers, self._donfig = flat, cfg

    @staticmethod
    def _dask(flat: dict[str, Setting], triples: Iterator[tuple[str, Any, str]]) -> None:
        """Add dask's keys that we implement (``(dask key, value, source)``) to ``flat``."""
        for key, value, source in triples:
            ours = DASK_KEYS.get(key)
            if ours is None and key.startswith("jobqueue.") and key.count(".") == 2:
                ours = key
            if ours is None:
                continue  # one of dask's many keys we do not implement
            if ours != key:
                source += f" ({key})"
            if kind_of(ours) is not None:
                _check(ours, value, source, False)
            # Unknown jobqueue keys are kept: the cluster that reads the section warns.
            flat[ours] = Setting(value, source)

    def _ensure(self) -> tuple[dict[str, Setting], donfig.Config]:
        with self._lock:
            if self._donfig is None:
                self.refresh()
            return self._layers, self._donfig

    def get(self, key: str, default: Any = donfig.config_obj.no_default) -> Any:
        """The effective value of ``key`` (``"worker.memory.target"``).

        Raises:
            KeyError: no such key and no ``default``.
        """
        return self._ensure()[1].get(key, default)

    def set(self, arg: Mapping[str, Any] | None = None, **kwargs: Any):
        """Set values in this process (a context manager, or for good): donfig's ``Config.set``."""
        return self._ensure()[1].set(arg, **kwargs)

    def settings(self, prefix: str = "") -> dict[str, Setting]:
        """``{key: Setting}`` of every effective key under ``prefix``, with its source.

        Raises:
            ConfigError: a value set with :meth:`set` has the wrong type.
        """
        layers, cfg = self._ensure()
        out: dict[str, Setting] = {}
        for key, value in flatten(cfg.config):
            if not key.startswith(prefix):
                continue
            layered = layers.get(key)
            if layered is not None and layered.value == value:
                out[key] = layered
            else:
                _check(key, value, "config.set()", warn_unknown=False)
                out[key] = Setting(value, "config.set()")
        return out


#: The process's configuration.
config = Configuration()


def setting(key: str, given: Any = FROM_CONFIG) -> Any:
    """``given`` unless it is :data:`FROM_CONFIG`; then the configured value of ``key``.

    The one function through which constructors read their defaults::

        def __init__(self, memory_target_fraction=FROM_CONFIG):
            self.target = setting("worker.memory.target", memory_target_fraction)
    """
    if given is not FROM_CONFIG:
        return given
    return config.get(key)


def refresh(environ: Mapping[str, str] | None = None) -> None:
    """Read the configuration files and variables again (see :meth:`Configuration.refresh`)."""
    config.refresh(environ)


def get(key: str, default: Any = donfig.config_obj.no_default) -> Any:
    """The effective value of ``key`` (see :meth:`Configuration.get`)."""
    return config.get(key, default)


def settings(prefix: str = "") -> dict[str, Setting]:
    """Every effective key under ``prefix`` with its value and source."""
    return config.settings(prefix)


__all__ = ["FROM_CONFIG", "ConfigError", "ConfigWarning", "Configuration", "Setting", "config",
           "get", "refresh", "setting", "settings"]
