"""Each rank of ``python -m cluster`` imports only what its role needs; the public names still work."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _modules_after(code: str) -> set[str]:
    out = subprocess.run([sys.executable, "-c", code + "\nimport json, sys; print(json.dumps(sorted(sys.modules)))"],
                         cwd=ROOT, capture_output=True, text=True, timeout=60, check=True)
    return set(json.loads(out.stdout.splitlines()[-1]))


def test_the_launcher_imports_no_client_scheduler_or_local_cluster():
    loaded = _modules_after("import cluster.__main__, cluster.hpc.launcher")
    # (The packages cluster.runtime.scheduler and cluster.runtime.worker import their
    # servers on first use: the worker package itself is light, its server is not.)
    assert not {"cluster.runtime.client", "cluster.runtime.scheduler", "cluster.runtime.local", "cluster.runtime.nanny",
                "cluster.runtime.worker.server", "cluster.runtime.worker.state", "cluster.hpc.api",
                "cluster.jobqueue"} & loaded


def test_a_worker_rank_imports_no_scheduler_or_client():
    loaded = _modules_after("import cluster.__main__, cluster.hpc.launcher, cluster.runtime.nanny")
    assert "cluster.runtime.nanny" in loaded
    assert not {"cluster.runtime.client", "cluster.runtime.scheduler", "cluster.runtime.local"} & loaded


def test_public_names_resolve():
    import cluster.runtime.progress  # the submodule must not shadow the function

    import cluster
    from cluster import hpc, runtime

    for name in runtime.__all__:
        assert getattr(runtime, name) is not None, name
    for name in cluster.__all__:
        assert getattr(cluster, name) is not None, name
    assert callable(runtime.progress) and not hasattr(runtime.progress, "__file__")
    assert cluster.Client is runtime.Client and cluster.LocalCluster is runtime.LocalCluster
    assert callable(hpc.initialize)
    from cluster.runtime import Nanny, Scheduler, Security, Worker  # noqa: F401

    from cluster import Client, Future, LocalCluster, wait  # noqa: F401
