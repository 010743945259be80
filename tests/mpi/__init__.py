"""Tests of the MPI launcher and ``hpc.initialize()`` (``hpc/``).

They start ``mpiexec`` themselves (or need no MPI at all), so they run in a
plain ``pytest`` run; ``tests/conftest.py`` stops pytest-mpi from skipping them
just because of this directory's name.
"""
