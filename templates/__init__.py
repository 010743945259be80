"""Job-script templates (jinja2) of the batch-queue clusters, shipped with the package.

One template per batch system for the clusters' worker jobs: ``slurm.sh.j2``,
``pbs.sh.j2``; and one for a one-shot MPI job (:mod:`cluster.jobqueue.submit`), which
extends it: ``slurm-mpi.sh.j2``, ``pbs-mpi.sh.j2``.  They are
package data of this package, so that a wheel and an editable install both
carry them; :mod:`cluster.jobqueue.job` reads them with :mod:`importlib.resources`.
A user's own template (``template="my.sh.j2"``) may ``{% extends "slurm.sh.j2" %}``
and override its blocks: ``shebang``, ``directives``, ``extra_directives``,
``environment``, ``prologue``, ``worker``, ``epilogue``.
"""

from importlib.resources import files


def names() -> list[str]:
    """The names of the templates shipped here (``["pbs-mpi.sh.j2", "pbs.sh.j2", ...]``)."""
    return sorted(p.name for p in files(__name__).iterdir() if p.name.endswith(".j2"))


def source(name: str) -> str:
    """The text of the shipped template ``name``.

    Raises:
        FileNotFoundError: there is no such template.
    """
    path = files(__name__).joinpath(name)
    if not name.endswith(".j2") or not path.is_file():
        raise FileNotFoundError(f"no template {name!r} among {names()}")
    return path.read_text(encoding="utf-8")
