"""Benchmarks: this project's runtime against dask.distributed and mpi4py.futures.

Run with ``python -m bench`` (or ``bash scripts/bench.sh``); see bench/README.md.
"""
