"""Versions of Python and the packages that must agree across a cluster.

On HPC systems the login node (the client), the scheduler's node and the
compute nodes often run different environments -- a module loaded in one job
script and not another, a conda environment activated on one node only.
Results then fail in odd ways (pickles that will not load, ``cloudpickle``
protocol errors), so, as dask.distributed does:

* every worker sends :func:`get_versions` in its registration, and the
  scheduler logs a warning for a worker whose Python or ``cluster`` version
  differs from its own (:func:`registration_mismatch`);
* ``Client.get_versions(check=True)`` collects the client's, the scheduler's
  and each worker's versions and raises :class:`VersionMismatchError` naming
  each package whose versions differ, and where.

Versions are read from package metadata (``importlib.metadata``), so asking
for numpy's version does not import numpy.
"""

from __future__ import annotations

import locale
import os
import platform
import struct
import sys
from collections.abc import Iterable
from typing import Any

#: What every member reports (``None`` for a package that is not installed).
#: ``cluster`` is this project (the ``hpc-cluster`` distribution).
PACKAGES = ("python", "cluster", "cloudpickle", "msgpack", "tornado", "numpy", "pandas", "dask",
            "psutil")

#: The distribution to read for a package name, where they differ.
_DISTRIBUTIONS = {"cluster": "hpc-cluster"}

#: A worker differing from its scheduler in one of these is warned about when it registers.
REGISTRATION_CHECKED = ("python", "cluster")


class VersionMismatchError(ValueError):
    """``get_versions(check=True)`` found packages whose versions differ across the cluster."""


def python_version() -> str:
    """``major.minor.micro`` of this interpreter (plus the release level when not final)."""
    v = sys.version_info
    text = f"{v.major}.{v.minor}.{v.micro}"
    return text if v.releaselevel == "final" else f"{text}{v.releaselevel}{v.serial}"


def package_version(name: str) -> str | None:
    """The installed version of package ``name`` (``None`` when it is not installed)."""
    if name == "python":
        return python_version()
    if name == "cluster":
        import cluster

        return cluster.__version__
    import importlib.metadata  # here: importing it costs a worker ~50 ms at start

    try:
        return importlib.metadata.version(_DISTRIBUTIONS.get(name, name))
    except importlib.metadata.PackageNotFoundError:
        module = sys.modules.get(name)  # a package run from a source tree has no metadata
        version = getattr(module, "__version__", None)
        return str(version) if version is not None else None
    except Exception:  # a broken distribution must not stop a worker from registering
        return None


def host_info() -> dict[str, Any]:
    """Where this process runs: interpreter, operating system, machine, locale."""
    return {
        "python": python_version(),
        "python-bits": struct.calcsize("P") * 8,
        "OS": platform.system(),
        "OS-release": platform.release(),
        "machine": platform.machine(),
        "processor": platform.processor(),
        "byteorder": sys.byteorder,
        "LC_ALL": os.environ.get("LC_ALL", "None"),
        "LANG": os.environ.get("LANG", "None"),
        "encoding": locale.getpreferredencoding(False),
    }


_cache: dict[str, str | None] = {}


def get_versions(packages: Iterable[str] | None = None) -> dict[str, Any]:
    """``{"host": ..., "packages": {name: version or None}}`` for this process.

    Args:
        packages: more package names to report besides :data:`PACKAGES`.
    """
    names = list(PACKAGES) + [p for p in (packages or ()) if p not in PACKAGES]
    out = {}
    for name in names:
        if name not in _cache:
            _cache[name] = package_version(name)
        out[name] = _cache[name]
    return {"host": host_info(), "packages": out}


def registration_versions() -> dict[str, Any]:
    """What a worker sends when it registers: the versions :data:`REGISTRATION_CHECKED`
    (cheap: no package metadata is read)."""
    return {"packages": {name: package_version(name) for name in REGISTRATION_CHECKED}}


def mismatches(scheduler: dict | None, workers: dict[str, dict | None], client: dict | None,
               packages: Iterable[str] | None = None) -> dict[str, dict[str, Any]]:
    """``{package: {where: version}}`` for each package whose versions differ.

    ``where`` is ``"client"``, ``"scheduler"`` or a worker's address; a member
    that reported nothing counts as ``"UNKNOWN"``.
    """
    members: dict[str, dict] = {}
    if client is not None:
        members["client"] = client
    members["scheduler"] = scheduler or {}
    for addr, info in workers.items():
        members[addr] = info or {}
    names: list[str] = list(PACKAGES) + [p for p in (packages or ()) if p not in PACKAGES]
    out: dict[str, dict[str, Any]] = {}
    for name in names:
        seen = {where: (info.get("packages") or {}).get(name, "UNKNOWN") if info else "UNKNOWN"
                for where, info in members.items()}
        if len(set(map(str, seen.values()))) > 1:
            out[name] = seen
    return out


def mismatch_message(found: dict[str, dict[str, Any]]) -> str:
    """The error text of :class:`VersionMismatchError`: one block per package."""
    lines = ["Mismatched versions found:"]
    for name, seen in found.items():
        lines.append(f"  {name}:")
        for where, version in seen.items():
            lines.append(f"    {where}: {version if version is not None else 'not installed'}")
    return "\n".join(lines)


def check_versions(versions: dict[str, Any], packages: Iterable[str] | None = None) -> None:
    """Raise if the ``{"scheduler", "workers", "client"}`` versions disagree.

    Raises:
        VersionMismatchError: naming each package and the differing versions.
    """
    found = mismatches(versions.get("scheduler"), versions.get("workers") or {},
                       versions.get("client"), packages)
    if found:
        raise VersionMismatchError(mismatch_message(found))


def registration_mismatch(scheduler: dict, worker: dict | None) -> str | None:
    """What a registering worker's versions differ in from the scheduler's (``None``: nothing).

    Only :data:`REGISTRATION_CHECKED` count; a worker that sent no versions is
    reported as such.
    """
    if not worker or not isinstance(worker.get("packages"), dict):
        return "it sent no versions"
    ours, theirs = scheduler.get("packages") or {}, worker["packages"]
    diffs = [f"{name} {theirs.get(name)} (scheduler: {ours.get(name)})"
             for name in REGISTRATION_CHECKED if theirs.get(name) != ours.get(name)]
    return ", ".join(diffs) or None


__all__ = [
    "PACKAGES",
    "VersionMismatchError",
    "check_versions",
    "get_versions",
    "mismatch_message",
    "mismatches",
    "package_version",
    "registration_mismatch",
    "registration_versions",
]
