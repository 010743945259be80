"""Recovery as whole scenarios on the in-memory cluster (:mod:`tests.harness`): workers
lost at every step of a graph, all workers lost, a replica lost while being fetched,
work waiting for the first worker, restart, results shared between clients.  No
sockets; every machine validates its state and :meth:`Cluster.check` compares the
scheduler's view with the workers' whenever the cluster is at rest.
"""

from __future__ import annotations

import operator
from collections import Counter

import pytest
from cluster.runtime.scheduler.events import RestartEvent
from cluster.runtime.scheduler.records import CancelledKeyMsg, KeyInMemoryMsg, TaskErredClientMsg

from tests.harness import Cluster

pytestmark = pytest.mark.timeout(60)


def diamond_tree() -> tuple[dict, str, int]:
    """Eight leaves, two layers of sums over them, and a total: ``(tasks, top key, value)``."""
    tasks: dict = {f"leaf-{i}": (i,) for i in range(8)}
    for i in range(4):
        tasks[f"pair-{i}"] = (operator.add, f"leaf-{2 * i}", f"leaf-{2 * i + 1}")
    tasks["half-0"] = (operator.add, "pair-0", "pair-1")
    tasks["half-1"] = (operator.add, "pair-2", "pair-3")
    tasks["total"] = (operator.add, "half-0", "half-1")
    return tasks, "total", sum(range(8))


def count_steps() -> int:
    c = Cluster()
    c.add_worker("a")
    c.add_worker("b")
    tasks, top, _ = diamond_tree()
    c.update_graph(tasks, keys=[top])
    n = 0
    while c.step():
        n += 1
    return n


@pytest.mark.parametrize("victim", ["a", "b"])
def test_losing_a_worker_at_any_step_of_a_graph_costs_no_result(victim: str) -> None:
    for at in range(count_steps() + 1):
        c = Cluster()
        c.add_worker("a")
        c.add_worker("b")
        tasks, top, value = diamond_tree()
        c.update_graph(tasks, keys=[top])
        for _ in range(at):
            if not c.step():
                break
        # Executions already started on the survivor count as before the loss.
        before = c.calls + Counter(item[0] for src, dst, item in c.queue
                                   if src == "execute" and dst != c.address(victim))
        c.kill_worker(victim)
        c.add_worker("c")
        c.run_until_idle()
        assert c.result(top) == value, at
        assert c.reports_of(TaskErredClientMsg) == [], at
        # Only what the client wants is left in memory.
        assert [k for k, ts in c.scheduler.tasks.items() if ts.who_has] == [top], at
        # What was lost is recomputed once, not more.
        assert all(n <= 1 for n in (c.calls - before).values()), (at, c.calls - before)


def test_losing_every_worker_mid_graph_then_one_joins() -> None:
    c = Cluster()
    c.add_worker("a")
    c.add_worker("b")
    tasks, top, value = diamond_tree()
    c.update_graph(tasks, keys=[top])
    for _ in range(12):
        c.step()
    c.kill_worker("a")
    c.kill_worker("b")
    c.run_until_idle()
    assert c.scheduler.workers == {}
    assert all(ts.state in ("released", "waiting", "queued", "no-worker") for ts in c.scheduler.tasks.values())
    c.add_worker("new")
    c.run_until_idle()
    assert c.result(top) == value and c.reports_of(TaskErredClientMsg) == []


def test_work_submitted_before_any_worker_runs_when_one_joins() -> None:
    c = Cluster()
    c.update_graph({"x": (1,), "y": (operator.neg, "x"), "r": (2,)},
                   restrictions={"r": ["gpu-host"]})
    c.run_until_idle()
    assert c.state("x") in ("queued", "no-worker") and c.state("r") == "no-worker"
    c.add_worker("a")
    c.run_until_idle()
    assert c.result("y") == -1 and c.state("r") == "no-worker"
    c.add_worker("gpu-host")
    c.run_until_idle()
    assert c.result("r") == 2


def test_a_replica_lost_while_being_fetched_is_fetched_from_the_other_copy() -> None:
    c = Cluster()
    c.add_worker("a")
    c.add_worker("c")
    b = c.add_worker("b")
    c.submit("x", 9, restrictions={"x": ["a"]})
    c.run_until_idle()
    c.replicate(["x"], n=2)
    c.submit("y", operator.neg, "x", restrictions={"y": ["b"]})
    while not (c.queue and c.queue[0][0] == "gather"):
        assert c.step()
    peer = c.queue[0][2].worker
    c.kill_worker(peer.removeprefix("sim://"))
    c.run_until_idle()
    assert c.result("y") == -9 and c.calls["x"] == 1  # not recomputed: the other copy served
    fetches = [g[2].worker for g in c.gather_log if g[1] == c.address("b")]
    assert len(fetches) == 2 and fetches[0] == peer and fetches[1] != peer
    assert b.data["x"] == 9


def test_a_key_wanted_by_two_clients_is_computed_once_and_reported_to_both() -> None:
    c = Cluster()
    c.add_worker("a")
    c.submit("x", 1, client="c1")
    c.blocked.add("x")
    c.run_until_idle()
    c.submit("x", 1, client="c2")  # while it runs
    c.unblock("x")
    c.run_until_idle()
    assert c.calls["x"] == 1
    assert [m.key for m in c.reports_of(KeyInMemoryMsg, "c1")] == ["x"]
    assert [m.key for m in c.reports_of(KeyInMemoryMsg, "c2")] == ["x"]
    c.submit("x", 1, client="c3")  # once in memory: answered at once
    c.run_until_idle()
    assert [m.key for m in c.reports_of(KeyInMemoryMsg, "c3")] == ["x"] and c.calls["x"] == 1


def test_restart_forgets_everything_and_tells_the_clients() -> None:
    c = Cluster()
    c.add_worker("a")
    c.add_worker("b")
    c.update_graph({"x": (1,), "y": (operator.neg, "x"), "z": (3,)}, keys=["y", "z"], client="c1")
    c.submit("w", 4, client="c2")
    c.blocked.add("z")
    c.run_until_idle()
    c._route_scheduler(c.scheduler.handle(RestartEvent(c.sid("restart"))))
    for name in ("a", "b"):  # the nannies replace the processes
        c.kill_worker(name)
        c.add_worker(name)
    c.blocked.clear()
    c.run_until_idle()
    assert c.scheduler.tasks == {}
    assert {m.key for m in c.reports_of(CancelledKeyMsg, "c1")} == {"y", "z"}
    assert [m.key for m in c.reports_of(CancelledKeyMsg, "c2")] == ["w"]
    assert [e[2] for e in c.scheduler.story("x")][-1] == "forgotten"
    assert all(not w.tasks for w in c.workers.values())
    c.submit("x", 5)  # the same key afterwards is new work
    c.run_until_idle()
    assert c.result("x") == 5


def test_erred_task_released_and_forgotten_everywhere() -> None:
    c = Cluster()
    a = c.add_worker("a")

    def bad() -> None:
        raise ValueError("bad")

    c.update_graph({"x": (bad,), "y": (operator.neg, "x")}, keys=["y"])
    c.run_until_idle()
    assert c.state("y") == "erred"
    assert a.tasks["x"].state == "error"  # the worker keeps the error for the record
    c.release("y")
    c.run_until_idle()
    assert c.scheduler.tasks == {} and a.tasks == {}


def test_dependency_on_a_paused_worker_is_fetched_and_the_dependent_runs_elsewhere() -> None:
    c = Cluster()
    c.add_worker("a")
    b = c.add_worker("b")
    c.update_graph({"x": (2,), "y": (operator.mul, "x", "x")}, keys=["y"], restrictions={"x": ["a"]})
    c.blocked.add("x")
    c.run_until_idle()
    c.pause("a")  # x is running there and finishes while paused
    c.unblock("x")
    c.run_until_idle()
    assert c.result("y") == 4 and "y" in b.data
    assert c.worker("a").executed_count == 1
