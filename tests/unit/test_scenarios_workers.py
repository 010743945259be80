"""The workers' side of whole scenarios on the in-memory cluster (:mod:`tests.harness`):
threads and secede, fetching dependencies (once, from a paused peer, from a peer the
network cannot reach, released while in flight), pause, retirement plans, and the
decisions taken on a tick of time (worker TTL, idle timeout).  No sockets; every
machine validates its state (``validate=True``) and :meth:`Cluster.check` compares
the scheduler's view with the workers' at rest.
"""

from __future__ import annotations

import operator

import pytest
from cluster.runtime.errors import KilledWorker
from cluster.runtime.scheduler import elastic
from cluster.runtime.scheduler.events import LongRunningEvent
from cluster.runtime.scheduler.records import TaskErredClientMsg
from cluster.runtime.worker import events as wev

from tests.harness import SCHEDULER, Cluster

pytestmark = pytest.mark.timeout(30)


def holders(c: Cluster, key: object) -> set[str]:
    return {ws.name for ws in c.scheduler.tasks[key].who_has}


def moves(story: list[tuple], key: object) -> list[tuple[str, str]]:
    return [(e[1], e[2]) for e in story if e[0] == key]


def gathers(c: Cluster, worker: str) -> list[wev.GatherDep]:
    """The transfers ``worker`` started (its GatherDep instructions, from its log)."""
    return [e for e in c.gather_log if e[1] == c.address(worker)]


# ----------------------------------------------------------------------------- threads, secede


def test_two_threads_run_two_tasks_at_once() -> None:
    c = Cluster()
    a = c.add_worker("a", 2)
    c.blocked.update({"x", "y", "z"})
    c.update_graph({"x": (1,), "y": (2,), "z": (3,)})
    c.run_until_idle()
    assert len(a.executing) == 2 and c.state("z") in ("processing", "queued")
    c.unblock("x", "y", "z")
    c.run_until_idle()
    assert [c.result(k) for k in "xyz"] == [1, 2, 3]


def test_seceded_task_frees_its_thread_for_another() -> None:
    c = Cluster()
    a = c.add_worker("a", 1)
    c.submit("seceder", "s")
    c.blocked.add("seceder")
    c.run_until_idle()
    c.secede("seceder")
    c.run_until_idle()
    ws = c.scheduler.workers[c.address("a")]
    assert a.tasks["seceder"].state == "long-running" and not a.executing
    assert [ts.key for ts in ws.long_running] == ["seceder"]
    assert ws.processing[c.scheduler.tasks["seceder"]] == 0.0  # no longer counted as load
    c.submit("setter", "t")
    c.run_until_idle()
    assert c.result("setter") == "t" and c.state("seceder") == "processing"
    c.unblock("seceder")
    c.run_until_idle()
    assert c.result("seceder") == "s" and not ws.long_running and not a.long_running
    assert moves(a.story("seceder"), "seceder")[-1] == ("long-running", "memory")


def test_long_running_report_from_a_worker_that_no_longer_runs_it_is_ignored() -> None:
    c = Cluster()
    c.add_worker("a")
    c.add_worker("b")
    c.submit("x", 1, restrictions={"x": ["a"]})
    c.run_until_idle()
    c.queue.append((c.address("b"), SCHEDULER, LongRunningEvent("x", c.address("b"), 1.0, "late")))
    c.run_until_idle()
    assert not c.scheduler.tasks["x"].long_running
    assert all(not ws.long_running for ws in c.scheduler.workers.values())


# ----------------------------------------------------------------------------- fetching


def test_a_dependency_needed_by_two_tasks_is_fetched_once() -> None:
    c = Cluster()
    c.add_worker("a")
    b = c.add_worker("b", 2)
    c.update_graph({"x": (10,), "y1": (operator.neg, "x"), "y2": (operator.pos, "x")},
                   keys=["y1", "y2"], restrictions={"x": ["a"], "y1": ["b"], "y2": ["b"]})
    c.run_until_idle()
    assert (c.result("y1"), c.result("y2")) == (-10, 10)
    assert [set(g[2].keys) for g in gathers(c, "b")] == [{"x"}]
    assert moves(b.story("x"), "x").count(("fetch", "flight")) == 1


def test_paused_worker_still_serves_its_data() -> None:
    c = Cluster()
    a = c.add_worker("a")
    c.add_worker("b")
    c.submit("x", 5, restrictions={"x": ["a"]})
    c.run_until_idle()
    c.pause("a")
    c.run_until_idle()
    c.submit("y", operator.neg, "x")
    c.run_until_idle()
    assert c.result("y") == -5 and holders(c, "y") == {"b"}
    assert a.executed_count == 1  # a ran nothing new while paused
    assert holders(c, "x") == {"a", "b"}


def test_dependency_released_while_in_flight_is_dropped_when_it_lands() -> None:
    c = Cluster()
    c.add_worker("a")
    b = c.add_worker("b")
    c.update_graph({"x": (1,), "y": (operator.neg, "x")}, keys=["x", "y"],
                   restrictions={"x": ["a"], "y": ["b"]})
    while not (c.queue and c.queue[0][0] == "gather"):
        assert c.step()
    assert b.tasks["x"].state == "flight"
    transfer = c.queue.popleft()  # the transfer takes a while: the free-keys overtakes it
    c.release("y")
    c.run_until_idle()
    assert b.tasks["x"].state == "cancelled"
    c.queue.append(transfer)
    c.run_until_idle()
    assert "y" not in c.calls and c.state("y") == "forgotten"
    assert "x" not in b.data and "y" not in b.tasks
    assert holders(c, "x") == {"a"} and c.result("x") == 1
    assert ("flight", "cancelled") in moves(b.story("x"), "x")


def test_fetch_from_a_peer_that_just_dropped_the_key_falls_back_to_another_replica() -> None:
    c = Cluster()
    c.add_worker("a")
    c.add_worker("c")
    b = c.add_worker("b")
    c.submit("x", 3, restrictions={"x": ["a"]})
    c.run_until_idle()
    c.replicate(["x"], n=2)
    assert holders(c, "x") == {"a", "c"}
    c.submit("y", operator.neg, "x", restrictions={"y": ["b"]})
    while not (c.queue and c.queue[0][0] == "gather"):
        assert c.step()
    transfer = c.queue.popleft()
    first = transfer[2].worker
    # While b's request is on its way, the peer drops its replica (as replicate(n=1)
    # tells it to): it answers without x, b reports missing-data and is pointed at
    # the other copy.
    c.queue.append((SCHEDULER, first, wev.RemoveReplicasEvent("remove_replicas-race", ["x"])))
    c.run_until_idle()
    assert "x" not in c.workers[first].data
    c.queue.append(transfer)
    c.run_until_idle()
    assert c.result("y") == -3 and c.calls["x"] == 1
    [second] = [g[2].worker for g in gathers(c, "b")[1:]]
    assert {first, second} == {c.address("a"), c.address("c")}
    assert holders(c, "x") == {"b", second.removeprefix("sim://")}
    assert moves(b.story("x"), "x").count(("fetch", "flight")) == 2


def test_network_failure_from_a_live_peer_does_not_orphan_its_copy() -> None:
    c = Cluster()
    a = c.add_worker("a")
    c.submit("x", 4)
    c.run_until_idle()
    c.add_worker("b")
    c.add_worker("c")
    c.submit("busy", 0, restrictions={"busy": ["a"]})
    c.blocked.add("busy")
    c.run_until_idle()
    c.unreachable.add(c.address("a"))
    c.submit("y", operator.neg, "x", restrictions={"y": ["b"]})
    while not (c.queue and c.queue[0][0] == "gather"):
        assert c.step()
    assert c.step()  # the transfer fails once ...
    c.unreachable.clear()  # ... and the network heals
    c.run_until_idle()  # check(): the copy the scheduler stopped counting is dropped (or counted again)
    assert c.result("y") == -4
    c.release("x", "y")
    c.run_until_idle()
    assert "x" not in a.data


# ----------------------------------------------------------------------------- killed workers


def test_killed_worker_at_the_first_death_with_no_allowed_failures() -> None:
    c = Cluster(allowed_failures=0)
    c.add_worker("a")
    c.add_worker("b")
    c.update_graph({"bomb": (1,), "after": (operator.neg, "bomb")}, keys=["after"])
    c.blocked.add("bomb")
    c.run_until_idle()
    c.kill_worker(c.scheduler.tasks["bomb"].processing_on.name)
    c.run_until_idle()
    assert c.state("bomb") == "erred" and c.state("after") == "erred"
    [err] = c.reports_of(TaskErredClientMsg)  # the client wants 'after' only
    assert err.key == "after" and isinstance(err.exception, KilledWorker) and "bomb" in str(err.exception)
    assert c.scheduler.tasks["bomb"].exception is err.exception
    assert len(c.workers) == 1 and next(iter(c.workers.values())).tasks == {}


def test_safe_removal_does_not_count_towards_killed_worker() -> None:
    c = Cluster(allowed_failures=0)
    c.add_worker("a")
    c.add_worker("b")
    c.submit("x", 1, restrictions={"x": ["a"]}, loose_restrictions=["x"])
    c.blocked.add("x")
    c.run_until_idle()
    assert c.retire("a")
    c.unblock("x")
    c.run_until_idle()
    assert c.result("x") == 1 and holders(c, "x") == {"b"}


# ----------------------------------------------------------------------------- retire


def test_retire_two_workers_at_once_moves_their_data_to_the_third() -> None:
    c = Cluster()
    for name in "abc":
        c.add_worker(name)
    c.update_graph({"x": (1,), "y": (2,), "z": (3,)}, restrictions={"x": ["a"], "y": ["b"], "z": ["c"]})
    c.run_until_idle()
    addrs = [c.address("a"), c.address("b")]
    instrs, plan = elastic.retire_plan(c.scheduler, addrs, "r")
    assert plan == {"x": c.address("c"), "y": c.address("c")}  # not from one retiree to the other
    c._route_scheduler(instrs)
    c.run_until_idle()
    for name in "ab":
        c.kill_worker(name)  # the replicas have landed: losing them loses nothing
    c.run_until_idle()
    assert {k: holders(c, k) for k in "xyz"} == {"x": {"c"}, "y": {"c"}, "z": {"c"}}
    assert set(c.calls.values()) == {1}


def test_retire_a_worker_whose_data_is_also_elsewhere_copies_nothing() -> None:
    c = Cluster()
    c.add_worker("a")
    b = c.add_worker("b")
    c.submit("x", 1, restrictions={"x": ["a"]})
    c.run_until_idle()
    c.replicate(["x"])
    fetched = moves(b.story("x"), "x").count(("fetch", "flight"))
    assert c.retire("a")
    assert moves(b.story("x"), "x").count(("fetch", "flight")) == fetched
    assert holders(c, "x") == {"b"}


def test_retire_refused_when_the_only_other_worker_is_paused() -> None:
    c = Cluster()
    a = c.add_worker("a")
    c.add_worker("b")
    c.submit("x", 1, restrictions={"x": ["a"]})
    c.run_until_idle()
    c.pause("b")
    c.run_until_idle()
    assert not c.retire("a")  # a paused worker takes no data
    assert c.scheduler.workers[c.address("a")].status == "running" and a.data == {"x": 1}
    c.pause("b", paused=False)
    c.run_until_idle()
    assert c.retire("a") and holders(c, "x") == {"b"}


def test_retiring_worker_takes_no_new_tasks() -> None:
    c = Cluster()
    c.add_worker("a")
    c.add_worker("b")
    c.submit("x", 1, restrictions={"x": ["a"]})
    c.run_until_idle()
    c._route_scheduler(elastic.retire_plan(c.scheduler, [c.address("a")], "r")[0])
    c.update_graph({f"t-{i}": (i,) for i in range(4)})
    c.run_until_idle()
    assert all(holders(c, f"t-{i}") == {"b"} for i in range(4))
    assert c.worker("a").executed_count == 1


# ----------------------------------------------------------------------------- time: TTL, idle


def test_worker_ttl_keeps_a_worker_that_heartbeats_again_in_time() -> None:
    c = Cluster(worker_ttl=10.0)
    c.add_worker("a")
    c.hang("a")
    c.advance(8)
    c.hung.clear()  # a heartbeat arrives at t+8, before the TTL ran out
    c.advance(8)
    c.run_until_idle()
    assert list(c.scheduler.workers) == [c.address("a")]
    c.hang("a")
    c.advance(11)
    c.run_until_idle()
    assert c.scheduler.workers == {} and c.workers == {}


def test_worker_ttl_reschedules_the_task_of_a_silent_worker_and_counts_it() -> None:
    c = Cluster(worker_ttl=10.0, allowed_failures=1)
    c.add_worker("a")
    c.add_worker("b")
    c.submit("x", 1, restrictions={"x": ["a"]}, loose_restrictions=["x"])
    c.blocked.add("x")
    c.run_until_idle()
    c.hang("a")
    c.advance(11)
    c.run_until_idle()
    assert c.address("a") not in c.scheduler.workers
    assert c.scheduler.tasks["x"].suspicious == 1  # a silent death is a failure
    c.unblock("x")
    c.run_until_idle()
    assert c.result("x") == 1 and holders(c, "x") == {"b"}


def test_worker_ttl_of_the_last_worker_leaves_tasks_waiting_for_one() -> None:
    c = Cluster(worker_ttl=5.0)
    c.add_worker("a")
    c.update_graph({"x": (1,), "y": (operator.neg, "x")}, keys=["y"])
    c.blocked.add("y")
    c.run_until_idle()
    c.hang("a")
    c.advance(6)
    c.run_until_idle()
    assert c.scheduler.workers == {}
    assert c.state("y") in ("waiting", "no-worker", "queued") and c.state("x") in ("queued", "no-worker")
    c.blocked.clear()
    c.add_worker("b")
    c.run_until_idle()
    assert c.result("y") == -1 and c.calls["x"] == 2


def test_idle_timeout_closes_a_scheduler_that_never_had_work() -> None:
    c = Cluster(idle_timeout=30.0)
    c.advance(1)  # the first tick starts the count
    c.advance(20)
    assert c.closed is None
    c.advance(20)
    assert c.closed is not None and "idle" in c.closed


def test_idle_timeout_waits_while_tasks_wait_for_a_worker() -> None:
    c = Cluster(idle_timeout=30.0)
    c.submit("x", 1)
    c.run_until_idle()
    assert c.state("x") in ("queued", "no-worker")
    for _ in range(4):
        c.advance(20)
    assert c.closed is None  # work is waiting: not idle
    c.add_worker("a")
    c.run_until_idle()
    assert c.result("x") == 1
    c.advance(20), c.advance(20)
    assert c.closed is not None


def test_idle_timeout_counts_from_the_last_submission() -> None:
    c = Cluster(idle_timeout=30.0)
    c.add_worker("a")
    c.advance(20)
    c.submit("x", 1)
    c.run_until_idle()  # done at once, between two ticks
    c.advance(20)
    c.advance(20)
    assert c.closed is None  # 40s since start, but only 20s since the work
    c.advance(20)
    assert c.closed is not None
