"""``client.get_versions(check=...)`` and the scheduler's warning about workers whose
Python or ``cluster`` version differs from its own (issue 13; :mod:`cluster.runtime.versions`).
"""

from __future__ import annotations

import logging
import sys

import cluster.runtime.worker.server as worker_server
import pytest
from cluster.runtime.versions import (
    PACKAGES,
    VersionMismatchError,
    check_versions,
    get_versions,
    mismatches,
    registration_mismatch,
)

import cluster
from cluster import Client, LocalCluster
from tests.helpers import gen_cluster, gen_test

pytestmark = pytest.mark.timeout(120)


def test_get_versions_of_this_process():
    v = get_versions(packages=["pytest"])
    assert set(v) == {"host", "packages"}
    packages = v["packages"]
    assert set(PACKAGES) | {"pytest"} == set(packages)
    assert packages["python"] == ".".join(map(str, sys.version_info[:3]))
    assert packages["cluster"] == cluster.__version__
    assert packages["pytest"] == pytest.__version__
    assert v["host"]["python-bits"] in (32, 64)
    assert get_versions(packages=["surely-not-installed-package"])["packages"][
        "surely-not-installed-package"] is None


def test_mismatches_name_each_package_and_where():
    same = get_versions()
    other = {"host": same["host"], "packages": {**same["packages"], "cloudpickle": "0.0.1"}}
    versions = {"scheduler": same, "workers": {"tcp://w1": same, "tcp://w2": other}, "client": same}
    found = mismatches(versions["scheduler"], versions["workers"], versions["client"])
    assert list(found) == ["cloudpickle"]
    assert found["cloudpickle"]["tcp://w2"] == "0.0.1"
    with pytest.raises(VersionMismatchError, match=r"cloudpickle:(.|\n)*tcp://w2: 0\.0\.1"):
        check_versions(versions)
    assert isinstance(VersionMismatchError("x"), ValueError)  # as dask raises
    check_versions({"scheduler": same, "workers": {"tcp://w1": same}, "client": same})
    # A worker that cannot answer counts as UNKNOWN, which differs.
    assert "python" in mismatches(same, {"tcp://w3": None}, same)


def test_registration_mismatch_checks_python_and_cluster_only():
    ours = get_versions()
    assert registration_mismatch(ours, {"packages": {"python": ours["packages"]["python"],
                                                     "cluster": cluster.__version__}}) is None
    problem = registration_mismatch(ours, {"packages": {"python": "2.7.18",
                                                        "cluster": cluster.__version__}})
    assert "python 2.7.18" in problem and f"scheduler: {ours['packages']['python']}" in problem
    assert registration_mismatch(ours, None) == "it sent no versions"


@gen_test(timeout=30)
async def test_client_get_versions_shape_and_check():
    async with gen_cluster(nworkers=2) as (c, s, (a, b)):
        v = await c.get_versions(check=True, packages=["pytest"])
        assert set(v) == {"scheduler", "workers", "client"}
        assert set(v["workers"]) == {a.address, b.address}
        for info in (v["scheduler"], v["client"], *v["workers"].values()):
            assert info["packages"]["cluster"] == cluster.__version__
            assert info["packages"]["pytest"] == pytest.__version__

        def older_numpy(packages=None):
            info = get_versions(packages)
            return {**info, "packages": {**info["packages"], "numpy": "1.0.0"}}

        b.handlers["versions"] = older_numpy
        v = await c.get_versions()  # check=False: reports, does not raise
        assert v["workers"][b.address]["packages"]["numpy"] == "1.0.0"
        with pytest.raises(VersionMismatchError, match=rf"numpy:(.|\n)*{b.address}: 1\.0\.0"):
            await c.get_versions(check=True)


@gen_test(timeout=30)
async def test_worker_with_other_versions_is_warned_about_when_it_registers(monkeypatch, caplog):
    monkeypatch.setattr(worker_server, "registration_versions",
                        lambda: {"packages": {"python": "3.0.0", "cluster": "0.0.0"}})
    with caplog.at_level(logging.WARNING, logger="cluster.runtime.scheduler.ops"):
        async with gen_cluster(nworkers=1) as (c, s, (a,)):
            assert await c.submit(len, "ab") == 2  # warned about, not refused
    warnings = [r.getMessage() for r in caplog.records if "other versions" in r.getMessage()]
    assert len(warnings) == 1
    assert a.address in warnings[0] and "python 3.0.0" in warnings[0] and "cluster 0.0.0" in warnings[0]


def test_get_versions_with_worker_processes():
    with LocalCluster(n_workers=1, threads_per_worker=1, dashboard_address=None) as lc, Client(lc) as c:
        v = c.get_versions(check=True)
        (worker,) = v["workers"].values()
        assert worker["packages"] == v["client"]["packages"]
        assert worker["host"]["python"] == v["scheduler"]["host"]["python"]

