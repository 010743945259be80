"""A dask-mpi style script: ``mpiexec -n 4 python initialize_script.py [EXIT_STATUS]``.

Rank 0 serves as the scheduler, ranks 2 and up as workers; only rank 1 (the
client) runs the code after ``hpc.initialize()``, then exits with EXIT_STATUS.
"""

import json
import sys

from cluster import hpc

hpc.initialize(nthreads=1, memory_limit=0, death_timeout=10)

from cluster import Client  # noqa: E402 - only the client rank gets here


def cube(x):
    return x ** 3


with Client() as client:
    total = client.submit(sum, client.map(cube, range(20))).result()
    names = sorted(str(w["name"]) for w in client.scheduler_info()["workers"].values())
    print(json.dumps({"total": total, "workers": names}), flush=True)
sys.exit(int(sys.argv[1]) if len(sys.argv) > 1 else 0)
