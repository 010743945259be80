"""Run the cluster in MPI jobs: the launcher and ``initialize()`` (dask-mpi's replacement).

Two ways to turn ``mpiexec -n N ...`` into a cluster:

* the launcher, ``mpiexec -n N python -m cluster [options] [script.py args...]``
  (:mod:`cluster.hpc.launcher`): rank 0 runs the scheduler (and the script, as the
  client), every other rank a worker named after its rank;
* :func:`initialize` in the user's own script, run as
  ``mpiexec -n N python script.py``: rank 0 runs the scheduler, rank 1 goes on
  with the script as the client, the other ranks serve as workers.

Either way the job ends by itself -- every rank returns, the exit status is the
script's -- and no rank waits forever for one that died (see :mod:`cluster.hpc.mpi`).
The role of each rank is decided by :mod:`cluster.hpc.roles`; what each role runs, by
:mod:`cluster.hpc.ranks`.
"""

__all__ = ["initialize"]


def __getattr__(name: str):
    # Imported on first use: the launcher's ranks (``python -m cluster``) do not need it.
    if name == "initialize":
        from .api import initialize

        return initialize
    raise AttributeError(f"module 'cluster.hpc' has no attribute {name!r}")
