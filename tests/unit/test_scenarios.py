"""Whole scenarios on the in-memory cluster of :mod:`tests.harness`: one scheduler
state and several worker states exchanging their instructions as events, with no
sockets, threads or event loop.  Each test checks final states, results, what the
client heard, and (where it explains the path taken) the tasks' stories.
"""

from __future__ import annotations

import operator

import pytest
from cluster.runtime.errors import KilledWorker
from cluster.runtime.execution import Reschedule
from cluster.runtime.scheduler.events import AddKeysEvent
from cluster.runtime.scheduler.records import (
    CancelledKeyMsg,
    KeyInMemoryMsg,
    TaskErredClientMsg,
)

from tests.harness import Cluster


def moves(story: list[tuple], key: object = None) -> list[tuple[str, str]]:
    """``(start, finish)`` of each entry of a story (only ``key``'s own moves if given)."""
    return [(e[1], e[2]) for e in story if key is None or e[0] == key]


def stimuli(story: list[tuple]) -> set[str]:
    return {e[4] for e in story}


def flaky(failures: int, value: object = "ok"):
    """A task function that raises ``failures`` times, then returns ``value``."""
    calls = []

    def f(*args: object) -> object:
        calls.append(args)
        if len(calls) <= failures:
            raise ValueError(f"failure {len(calls)}")
        return value

    return f


# ----------------------------------------------------------------------------- plain computing


def test_chain_result_and_story_joined_across_machines() -> None:
    c = Cluster()
    c.add_worker("a", 1)
    c.add_worker("b", 1)
    tasks: dict = {"inc-0": (0,)}
    for i in range(1, 6):
        tasks[f"inc-{i}"] = (lambda x: x + 1, f"inc-{i - 1}")
    c.update_graph(tasks, keys=["inc-5"])
    c.run_until_idle()

    assert c.result("inc-5") == 5
    [msg] = c.reports_of(KeyInMemoryMsg)
    assert msg.key == "inc-5" and msg.data is not None  # the small result came along
    # Intermediates were released everywhere (kept as records while a dependent exists).
    assert {k for k, ts in c.scheduler.tasks.items() if ts.state != "released"} == {"inc-5"}
    assert sum(len(w.data) for w in c.workers.values()) == 1
    assert all(n == 1 for n in c.calls.values())
    story = c.scheduler.story("inc-5")
    assert moves(story)[-2:] == [("waiting", "processing"), ("processing", "memory")]
    # The scheduler's log carries the worker's stimulus_id of the execution.
    assert "execute-inc-5" in stimuli(story)
    holder = c.workers[msg.workers[0]]
    assert ("executing", "memory") in moves(holder.story("inc-5"))


def test_tree_reduction_over_two_workers() -> None:
    c = Cluster()
    c.add_worker("a", 2)
    c.add_worker("b", 2)
    tasks: dict = {f"leaf-{i}": (i,) for i in range(8)}
    level = [f"leaf-{i}" for i in range(8)]
    n = 0
    while len(level) > 1:
        nxt = []
        for x, y in zip(level[::2], level[1::2], strict=True):
            n += 1
            tasks[f"add-{n}"] = (operator.add, x, y)
            nxt.append(f"add-{n}")
        level = nxt
    c.update_graph(tasks, keys=level)
    c.run_until_idle()

    assert c.result(level[0]) == sum(range(8))
    assert {k for k, ts in c.scheduler.tasks.items() if ts.who_has} == {level[0]}
    # Both workers took part; no task ran twice.
    assert all(w.executed_count for w in c.workers.values())
    assert set(c.calls.values()) == {1}
    assert all(set(w.data) <= {level[0]} for w in c.workers.values())


def test_dependencies_fetched_worker_to_worker() -> None:
    c = Cluster()
    a, b = c.add_worker("a"), c.add_worker("b")
    c.update_graph({"x": (1,), "y": (2,), "z": (operator.add, "x", "y")}, keys=["x", "y", "z"],
                   restrictions={"x": ["a"], "y": ["b"], "z": ["b"]})
    c.run_until_idle()

    assert c.result("z") == 3
    # x was computed on a and moved to b by b's GatherDep; the scheduler knows both copies.
    assert {ws.address for ws in c.scheduler.tasks["x"].who_has} == {c.address("a"), c.address("b")}
    assert b.data["x"] == 1 and a.data["x"] == 1
    assert moves(b.story("x"), "x") == [("released", "fetch"), ("fetch", "flight"), ("flight", "memory")]
    assert c.calls["x"] == 1
    assert b.tasks["z"].state == "memory" and "z" not in a.tasks

    # Released by the client: gone from every worker.
    c.release("x", "y", "z")
    c.run_until_idle()
    assert c.scheduler.tasks == {} and a.data == {} and b.data == {}
    assert a.tasks == {} and b.tasks == {}


# ----------------------------------------------------------------------------- failures


def test_task_failing_then_retried() -> None:
    c = Cluster()
    c.add_worker("a")
    c.update_graph({"x": (flaky(2, 10),), "y": (lambda v: v * 2, "x")}, keys=["y"], retries={"x": 2})
    c.run_until_idle()

    assert c.result("y") == 20
    assert c.calls["x"] == 3
    assert c.reports_of(TaskErredClientMsg) == []
    assert moves(c.scheduler.story("x")).count(("processing", "released")) == 2  # back to waiting twice
    assert moves(c.worker("a").story("x")).count(("executing", "error")) == 2


def test_task_failing_beyond_retries_blames_dependents() -> None:
    c = Cluster()
    c.add_worker("a")
    c.update_graph({"x": (flaky(5),), "y": (lambda v: v, "x")}, keys=["x", "y"], retries={"x": 1})
    c.run_until_idle()

    assert c.calls["x"] == 2
    assert c.state("x") == "erred" and c.state("y") == "erred"
    erred = {m.key: m for m in c.reports_of(TaskErredClientMsg)}
    assert set(erred) == {"x", "y"}
    assert str(erred["y"].exception) == "failure 2" and erred["y"].worker == c.address("a")
    assert "y" not in c.calls
    # Resubmitting the failed task tries it again (and its dependent).
    c.functions["x"] = (3, ())
    c.update_graph({"x": (3,)}, keys=["x"])
    c.run_until_idle()
    assert c.result("x") == 3
    assert c.state("y") == "memory" and c.result("y") == 3


def test_reschedule_places_the_task_again() -> None:
    c = Cluster()
    c.add_worker("a")
    done = []

    def once_rescheduled() -> str:
        if not done:
            done.append(1)
            raise Reschedule()
        return "ok"

    c.submit("x", once_rescheduled)
    c.run_until_idle()
    assert c.result("x") == "ok" and c.calls["x"] == 2
    assert ("executing", "rescheduled") in moves(c.worker("a").story("x")) or (
        ("executing", "released") in moves(c.worker("a").story("x")))


# ----------------------------------------------------------------------------- losing workers


def test_lose_worker_mid_computation() -> None:
    c = Cluster()
    c.add_worker("a")
    c.update_graph({"x": (5,), "y": (lambda v: v + 1, "x")}, keys=["y"])
    c.blocked.add("y")
    c.run_until_idle()
    assert c.worker("a").tasks["y"].state == "executing" and c.state("x") == "memory"
    c.add_worker("b")
    c.run_until_idle()

    c.kill_worker("a")  # holds x (its only copy) and is running y
    c.unblock("y")
    c.run_until_idle()

    assert c.result("y") == 6
    assert c.calls["x"] == 2  # the lost unique result was recomputed
    assert c.calls["y"] == 1  # the run on a never finished
    assert {ws.address for ws in c.scheduler.tasks["y"].who_has} == {c.address("b")}
    story = moves(c.scheduler.story("y"))
    assert story.count(("waiting", "processing")) == 2 and ("processing", "released") in story


def test_killed_worker_after_allowed_failures() -> None:
    c = Cluster(allowed_failures=1)
    for name in "abc":
        c.add_worker(name)
    c.submit("bomb", "boom")
    c.blocked.add("bomb")
    c.run_until_idle()
    for _ in range(2):
        victim = c.scheduler.tasks["bomb"].processing_on.address
        c.kill_worker(victim.removeprefix("sim://"))
        c.run_until_idle()

    assert c.state("bomb") == "erred"
    [err] = c.reports_of(TaskErredClientMsg)
    assert isinstance(err.exception, KilledWorker)
    assert c.scheduler.tasks["bomb"].suspicious == 2
    assert "bomb" not in next(iter(c.workers.values())).tasks


def test_peer_dies_while_its_data_is_in_flight() -> None:
    c = Cluster()
    c.add_worker("a")
    b = c.add_worker("b")
    c.update_graph({"x": (7,), "y": (lambda v: -v, "x")}, keys=["y"],
                   restrictions={"x": ["a"], "y": ["b"]}, loose_restrictions=["x"])
    while not (c.queue and c.queue[0][0] == "gather"):
        assert c.step()
    c.kill_worker("a")  # b's GatherDep from a will meet a closed peer
    c.run_until_idle()

    assert c.result("y") == -7
    assert c.calls["x"] == 2 and c.calls["y"] == 1
    assert ("flight", "missing") in moves(b.story("x")) or ("flight", "released") in moves(b.story("x"))


# ----------------------------------------------------------------------------- elasticity


def test_retire_copies_unique_data_then_removes() -> None:
    c = Cluster()
    a = c.add_worker("a")
    c.add_worker("b")
    c.update_graph({"x": ("data",), "y": (len, "x")}, keys=["x", "y"],
                   restrictions={"x": ["a"], "y": ["a"]})
    c.run_until_idle()
    assert set(a.data) == {"x", "y"}

    assert c.retire("a")
    assert c.address("a") not in c.scheduler.workers and c.address("a") not in c.workers
    assert c.result("x") == "data" and c.result("y") == 4
    assert c.calls == {"x": 1, "y": 1}  # nothing recomputed
    b = c.worker("b")
    assert moves(b.story("x"), "x") == [("released", "fetch"), ("fetch", "flight"), ("flight", "memory")]
    assert c.reports_of(TaskErredClientMsg) == []


def test_retire_while_a_task_runs_there_places_it_again_safely() -> None:
    c = Cluster(allowed_failures=0)
    c.add_worker("a")
    c.add_worker("b")
    c.update_graph({"x": (1,), "y": (operator.neg, "x")}, keys=["x", "y"],
                   restrictions={"x": ["a"], "y": ["a"]}, loose_restrictions=["y"])
    c.blocked.add("y")
    c.run_until_idle()
    assert c.worker("a").tasks["y"].state == "executing"

    assert c.retire("a")
    c.unblock("y")
    c.run_until_idle()
    assert c.result("y") == -1 and c.calls["x"] == 1
    assert c.scheduler.tasks["y"].suspicious == 0  # a safe removal is no failure
    assert c.reports_of(TaskErredClientMsg) == []


def test_retire_refused_without_a_recipient() -> None:
    c = Cluster()
    c.add_worker("a")
    c.submit("x", 1)
    c.run_until_idle()
    assert not c.retire("a")
    assert c.scheduler.workers[c.address("a")].status == "running"
    assert c.result("x") == 1


def test_pause_and_unpause() -> None:
    c = Cluster()
    c.add_worker("a")
    c.add_worker("b")
    c.pause("a")
    c.run_until_idle()
    c.update_graph({f"t-{i}": (i,) for i in range(4)})
    c.run_until_idle()
    assert all(next(iter(ts.who_has)).address == c.address("b") for ts in c.scheduler.tasks.values())

    c.pause("b")
    c.run_until_idle()
    c.update_graph({"late": ("l",)})
    c.run_until_idle()
    assert c.state("late") == "queued"  # nobody runs it while all are paused
    c.pause("a", paused=False)
    c.run_until_idle()
    assert c.result("late") == "l" and c.worker("a").data == {"late": "l"}


def test_paused_worker_keeps_its_ready_tasks_until_unpaused() -> None:
    c = Cluster()
    a = c.add_worker("a")
    c.update_graph({"x": (1,), "y": (operator.neg, "x")}, keys=["y"], restrictions={"y": ["a"]})
    c.pause("a")  # the worker pauses before the scheduler hears of it
    c.run_until_idle()
    assert c.state("y") in ("processing", "waiting", "queued")
    assert "y" not in c.calls
    c.pause("a", paused=False)
    c.run_until_idle()
    assert c.result("y") == -1 and a.executed_count == 2


def test_cancel_running_chain() -> None:
    c = Cluster()
    a = c.add_worker("a")
    c.update_graph({"x": (1,), "y": (operator.neg, "x"), "z": (operator.neg, "y")}, keys=["z"])
    c.blocked.add("y")
    c.run_until_idle()
    assert a.tasks["y"].state == "executing"

    c.cancel("z")
    c.run_until_idle(), c.unblock("y"), c.run_until_idle()
    assert c.scheduler.tasks == {}
    assert [m.key for m in c.reports_of(CancelledKeyMsg)] == ["z"]
    assert a.data == {} and a.tasks == {}  # the late result of y was thrown away
    assert ("executing", "cancelled") in moves(a.story("y"))
    assert "z" not in c.calls


def test_rootish_chunks_are_queued_and_streamed() -> None:
    c = Cluster()
    c.add_worker("a")
    c.add_worker("b")
    n = 40
    tasks: dict = {"array": (list(range(n)),)}
    for i in range(n):
        tasks[("chunk", i)] = (lambda arr, i=i: arr[i], "array")
    tasks["total"] = (lambda *xs: sum(xs), *(("chunk", i) for i in range(n)))
    c.update_graph(tasks, keys=["total"])
    chunks = [c.scheduler.tasks[("chunk", i)] for i in range(n)]
    assert all(ts.rootish for ts in chunks)

    most = 0
    while c.step():
        for ws in c.scheduler.workers.values():
            most = max(most, sum(ts.prefix == "chunk" for ts in ws.processing))
    c.check()
    assert c.result("total") == sum(range(n))
    assert c.calls["array"] == 1
    assert most <= 2  # each worker gets work as it has room: at most 2 per thread


def test_work_stealing() -> None:
    pytest.importorskip("cluster.runtime.scheduler.stealing", reason="the scheduler has no work stealing")


# ----------------------------------------------------------------------------- time


def test_worker_ttl_removes_a_hung_worker() -> None:
    c = Cluster(worker_ttl=10.0)
    c.add_worker("a")
    c.add_worker("b")
    c.update_graph({"x": (1,), "y": (2,)}, restrictions={"x": ["a"], "y": ["b"]},
                   loose_restrictions=["y"])
    c.run_until_idle()
    c.hang("b")
    c.advance(6)
    c.run_until_idle()
    assert c.address("b") in c.scheduler.workers
    c.advance(6)  # b silent for 12s > 10s
    c.run_until_idle()

    assert list(c.scheduler.workers) == [c.address("a")]
    assert c.result("y") == 2 and c.calls["y"] == 2  # b's unique result recomputed on a
    assert any(s.startswith("tick") for s in stimuli(c.scheduler.story("y")))


def test_idle_timeout_closes_after_work_is_done() -> None:
    c = Cluster(idle_timeout=30.0)
    c.add_worker("a")
    c.submit("x", 1)
    c.blocked.add("x")
    c.run_until_idle()
    c.advance(20), c.advance(20)
    assert c.closed is None  # busy
    c.unblock("x")
    c.run_until_idle()
    c.advance(20)
    assert c.closed is None
    c.advance(20)
    assert c.closed is not None and "idle" in c.closed


# ----------------------------------------------------------------------------- bugs found


def test_add_keys_crossing_a_recompute_keeps_the_replica() -> None:
    """Found by this harness: an add-keys crossing the decision to recompute the key on
    the same worker made the scheduler free the copy the worker then reported; the
    dependent waited forever."""
    c = Cluster(check=False)
    c.add_worker("a")
    b = c.add_worker("b")
    c.update_graph({"x": (1,), "y": (operator.neg, "x")}, keys=["y"],
                   restrictions={"x": ["a"], "y": ["b"]}, loose_restrictions=["x"])
    while not (c.queue and isinstance(c.queue[0][2], AddKeysEvent)):
        assert c.step()  # b has fetched x; its add-keys is on the wire
    c.kill_worker("a")
    c.run_until_idle()

    assert c.state("y") == "memory", (c.state("y"), b.tasks)  # stuck in 'processing'
    assert c.result("y") == -1
    c.check()


def test_killed_task_and_a_rescheduled_task_on_the_same_dead_worker() -> None:
    """Found by this harness: remove_worker validated the state between failing the
    killer and placing the worker's other task again ('processing on an unknown worker')."""
    c = Cluster(allowed_failures=1)
    for name in "abc":
        c.add_worker(name, 2)
    c.submit("x", 1)
    c.blocked.add("x")
    c.run_until_idle()
    c.kill_worker(c.scheduler.tasks["x"].processing_on.name)  # x: 1 failure
    c.run_until_idle()
    host = c.scheduler.tasks["x"].processing_on.name
    c.submit("y", 2, restrictions={"y": [host]}, loose_restrictions=["y"])
    c.blocked.add("y")
    c.run_until_idle()
    assert c.state("y") == "processing"

    c.kill_worker(host)  # x: 2 failures > 1 (KilledWorker); y: placed again
    c.unblock("y")
    c.run_until_idle()
    assert c.state("x") == "erred" and c.result("y") == 2
