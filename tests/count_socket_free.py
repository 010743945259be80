"""How many of the scheduler's and the worker's behaviour tests run without sockets (issue 12).

Run: ``.venv/bin/python tests/count_socket_free.py`` (``-v`` lists every test counted).

What is counted
---------------
*Test functions*, read from the files with :mod:`ast` (nothing is imported or collected).
A parametrized test counts once: its cases are variations of one behaviour, and
counting cases would let a single table of parameters move the figure.

Socket-free (no socket, thread or event loop): every test function of a
``tests/unit/`` module that drives the pure state machines, i.e. imports
:mod:`tests.harness` (the in-memory cluster) or one of the state machines' own
modules (:data:`STATE_MODULES`) -- and does not import a server
(:data:`SERVER_MODULES`; a unit test that builds a ``Scheduler`` object is not
counted on either side).

With sockets: the test functions of ``tests/integration/`` whose subject is the
scheduler's or the worker's behaviour (:data:`SOCKET_FILES`: whole files; and
:data:`SOCKET_TESTS`: the named tests of files that are mostly about something
else).  Deliberately left out, because their subject is not a scheduling or
worker-state decision: the client API (gather/scatter forms, futures, as_completed,
run, upload), the comm layer, TLS and authentication, the dashboard, the CLI,
collections, LocalCluster deployment, the nanny's process supervision, option
checking (test_bad_input) and wire robustness against malformed input.

A test that only skips (its body calls ``pytest.skip``/``importorskip`` and asserts
nothing, e.g. a placeholder for a feature not built) is counted on neither side.

The ratio printed is ``socket-free / (socket-free + with sockets)``.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent

#: Importing one of these makes a unit test module a state-machine test.
STATE_MODULES = {
    "tests.harness",
    "cluster.runtime.scheduler.state", "cluster.runtime.scheduler.stimuli", "cluster.runtime.scheduler.placement",
    "cluster.runtime.scheduler.elastic", "cluster.runtime.scheduler.events", "cluster.runtime.scheduler.validation",
    "cluster.runtime.worker.state", "cluster.runtime.worker.events", "cluster.runtime.worker.validation",
}
#: ...unless it also imports one of these (IO shells).
SERVER_MODULES = {"cluster.runtime.scheduler.server", "cluster.runtime.worker.server", "cluster", "cluster.runtime"}

#: Integration files that are about the scheduler's or the worker's behaviour, all of them.
SOCKET_FILES = {
    "test_servers.py": "scheduler and worker servers: heartbeats, TTL, idle, secede, reconnect, client close",
    "test_scheduler_ops.py": "retire, replicate, rebalance, plugins, lifetime, pause",
    "test_resilience.py": "losing workers: kill -9, retirement, lifetimes, spilling",
    "test_tasks_submit_tasks.py": "tasks that submit tasks: secede/rejoin, get_client",
    "test_dask_compat_servers.py": "retire closes, restart without nannies, port, name",
    "test_spill_disk_full.py": "a worker pauses when its spill disk is full",
}
#: Integration tests of a scheduling decision in files mostly about something else.
SOCKET_TESTS = {
    "test_client.py": {
        "test_failed_pure_task_runs_again_when_submitted_again", "test_submit_workers_restriction",
        "test_submit_allow_other_workers", "test_submit_resources", "test_submit_retries",
        "test_submit_priority_on_one_thread", "test_burst_spreads_over_idle_workers",
        "test_restriction_to_worker_name_that_joins_later", "test_future_cancel",
        "test_cancel_finished_future", "test_client_cancel_dependents",
        "test_dropping_last_future_releases_data", "test_dependency_fetched_worker_to_worker",
    },
    "test_nanny.py": {
        "test_sigkill_worker_is_replaced_and_its_task_rescheduled",
        "test_task_killing_its_worker_ends_in_killed_worker",
        "test_lifetime_restart_churn_loses_no_results",
        "test_lifetime_restart_of_three_workers_retiring_together_never_hangs",
    },
    "test_robustness.py": {
        "test_client_that_disconnects_mid_message_leaves_no_half_state",
        "test_client_process_killed_after_submit_leaves_only_what_others_want",
    },
}


def _parse(path: Path) -> ast.Module:
    return ast.parse(path.read_text(), filename=str(path))


def _placeholder(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> bool:
    """Only skips: calls ``skip``/``importorskip``, asserts nothing, expects no raise."""
    calls = {n.func.attr if isinstance(n.func, ast.Attribute) else getattr(n.func, "id", "")
             for n in ast.walk(fn) if isinstance(n, ast.Call)}
    asserts = any(isinstance(n, ast.Assert) for n in ast.walk(fn))
    return bool(calls & {"skip", "importorskip"}) and not asserts and "raises" not in calls


def test_functions(tree: ast.Module) -> list[str]:
    """Module-level and class-level ``test_*`` functions (sync or async), placeholders left out."""
    out = []
    for node in tree.body:
        body = node.body if isinstance(node, ast.ClassDef) and node.name.startswith("Test") else [node]
        out += [n.name for n in body if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)
                and n.name.startswith("test_") and not _placeholder(n)]
    return out


def imported_modules(tree: ast.Module) -> set[str]:
    mods: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            mods.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            mods.add(node.module)
            mods.update(f"{node.module}.{a.name}" for a in node.names)  # from runtime.scheduler import elastic
    return mods


def count() -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """``({unit file: socket-free tests}, {integration file: socket tests})``."""
    free: dict[str, list[str]] = {}
    for path in sorted((TESTS / "unit").glob("test_*.py")):
        tree = _parse(path)
        mods = imported_modules(tree)
        if mods & STATE_MODULES and not mods & SERVER_MODULES:
            free[path.name] = test_functions(tree)
    sock: dict[str, list[str]] = {}
    for path in sorted((TESTS / "integration").glob("test_*.py")):
        names = test_functions(_parse(path))
        if path.name in SOCKET_FILES:
            sock[path.name] = names
        elif path.name in SOCKET_TESTS:
            missing = SOCKET_TESTS[path.name] - set(names)
            if missing:  # keep the list honest when tests are renamed or moved
                print(f"note: {path.name} no longer has {sorted(missing)}", file=sys.stderr)
            sock[path.name] = [n for n in names if n in SOCKET_TESTS[path.name]]
    return free, sock


def main(argv: list[str]) -> int:
    verbose = "-v" in argv
    free, sock = count()
    n_free = sum(map(len, free.values()))
    n_sock = sum(map(len, sock.values()))
    for title, table in (("socket-free (tests/unit, state machines / harness)", free),
                         ("with sockets (tests/integration, scheduler/worker behaviour)", sock)):
        print(f"{title}:")
        for name, tests in table.items():
            print(f"  {len(tests):4d}  {name}")
            if verbose:
                print("".join(f"          {t}\n" for t in tests), end="")
    total = n_free + n_sock
    print(f"socket-free {n_free} / {total} = {100 * n_free / total:.1f}%  (with sockets: {n_sock})")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
