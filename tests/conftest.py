"""Test-wide fixtures: every test is checked for leaked processes, threads and ports."""

from __future__ import annotations

import gc
import os
import threading
import time

import psutil
import pytest
from cluster.runtime.security import Security

#: Worker processes import the test modules' functions by name.  They do not get
#: the working directory on sys.path (runtime.process.inherited_path), so the
#: repository root is named explicitly, as a user names theirs in PYTHONPATH.
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in os.environ.get("PYTHONPATH", "").split(os.pathsep):
    os.environ["PYTHONPATH"] = os.pathsep.join(
        [_ROOT, *filter(None, [os.environ.get("PYTHONPATH")])])


def _snapshot():
    proc = psutil.Process()
    children = {p.pid for p in proc.children(recursive=True)}
    threads = {t.ident: t.name for t in threading.enumerate()}
    try:
        conns = proc.net_connections(kind="inet")
    except psutil.Error:  # pragma: no cover
        conns = []
    listening = {c.laddr for c in conns if c.status == psutil.CONN_LISTEN}
    established = {(c.laddr, c.raddr) for c in conns if c.status == psutil.CONN_ESTABLISHED}
    return children, threads, listening, established


@pytest.fixture(autouse=True)
def check_leaks(request):
    """Fail a test that leaves a child process, thread, listening port or connection behind.

    Things get a few seconds (polled, not slept) to wind down after the test,
    since closing is asynchronous.
    """
    if request.node.get_closest_marker("no_leak_check"):
        yield
        return
    children0, threads0, listening0, established0 = _snapshot()
    yield
    deadline = time.monotonic() + 10
    while True:
        gc.collect()
        children, threads, listening, established = _snapshot()
        new_children = children - children0
        new_threads = {i: n for i, n in threads.items() if i not in threads0}
        new_listening = listening - listening0
        new_established = established - established0
        if not (new_children or new_threads or new_listening or new_established):
            return
        if time.monotonic() > deadline:
            for pid in new_children:
                try:
                    psutil.Process(pid).kill()
                except psutil.Error:
                    pass
            pytest.fail(
                f"test leaked: processes={sorted(new_children)} threads={sorted(new_threads.values())} "
                f"listening={sorted(new_listening)} connections={len(new_established)}"
            )
        time.sleep(0.05)  # polling interval of the deadline loop above, not synchronisation


_PYTEST_MPI_SKIP_REASON = "need --with-mpi option to run"


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config, items):
    """Run tests/mpi/ in a plain pytest run.

    Those tests start ``mpiexec`` themselves (or need no MPI), but pytest-mpi,
    without ``--with-mpi``, skips every test with ``mpi`` among its keywords,
    and a test's keywords include its directory names.  Take exactly that skip
    off again for tests that do not carry the ``mpi`` marker themselves.
    """
    for item in items:
        if "mpi" not in item.nodeid.split("/")[:-1] or any(m.name == "mpi" for m in item.iter_markers()):
            continue
        item.own_markers[:] = [
            m for m in item.own_markers
            if not (m.name == "skip" and m.kwargs.get("reason") == _PYTEST_MPI_SKIP_REASON)
        ]


@pytest.fixture(scope="module")
def sec() -> Security:
    """Fresh TLS credentials for one test module's cluster."""
    return Security.temporary()


@pytest.fixture(scope="module")
def other() -> Security:
    """A second, unrelated set of credentials (another cluster's CA)."""
    return Security.temporary()
