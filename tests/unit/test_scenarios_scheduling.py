"""Scheduling decisions as whole scenarios on the in-memory cluster (:mod:`tests.harness`):
placement and restrictions, resources, priorities, retries and resubmission, cancel,
release and forget across clients, scatter, replicate/rebalance, losing data and
workers, reconnection.  No sockets: one scheduler state and worker states passing
their instructions to each other as events, every machine with ``validate=True``,
and :meth:`Cluster.check` comparing the scheduler's view with the workers' at rest.

These replace loopback tests whose subject was the decision, not the IO (see
``tests/count_socket_free.py``).
"""

from __future__ import annotations

import operator

import pytest
from cluster.runtime.errors import ScatteredDataLost
from cluster.runtime.scheduler import elastic
from cluster.runtime.scheduler.records import CancelledKeyMsg, KeyInMemoryMsg, TaskErredClientMsg

from tests.harness import Cluster

pytestmark = pytest.mark.timeout(30)


def holders(c: Cluster, key: object) -> set[str]:
    """Names of the workers the scheduler counts as holding ``key``."""
    return {ws.name for ws in c.scheduler.tasks[key].who_has}


def ran_on(c: Cluster, key: object) -> set[str]:
    """Names of the workers whose story shows ``key`` executed there."""
    return {w.address.removeprefix("sim://") for w in c.workers.values()
            if any(e[0] == key and e[2] == "executing" for e in w.story(key))}


# ----------------------------------------------------------------------------- placement


def test_burst_spreads_over_idle_workers() -> None:
    c = Cluster()
    for name in "abcd":
        c.add_worker(name)
    keys = [f"t-{i}" for i in range(4)]
    c.blocked.update(keys)
    c.update_graph({k: (i,) for i, k in enumerate(keys)})
    c.run_until_idle()
    # One task per idle worker, not four on the first one.
    assert sorted(len(ws.processing) for ws in c.scheduler.workers.values()) == [1, 1, 1, 1]
    assert all(len(w.executing) == 1 for w in c.workers.values())
    c.unblock(*keys)
    c.run_until_idle()
    assert [c.result(k) for k in keys] == [0, 1, 2, 3]


def test_strict_restriction_waits_for_its_busy_worker_while_another_is_idle() -> None:
    c = Cluster()
    a, b = c.add_worker("a"), c.add_worker("b")
    c.submit("long", 1, restrictions={"long": ["a"]})
    c.blocked.add("long")
    c.run_until_idle()
    c.submit("x", 2, restrictions={"x": ["a"]})
    c.run_until_idle()
    assert c.state("x") in ("processing", "queued", "waiting") and "x" not in c.calls
    assert b.executed_count == 0 and not c.scheduler.workers[c.address("b")].processing
    c.unblock("long")
    c.run_until_idle()
    assert c.result("x") == 2 and holders(c, "x") == {"a"} and ran_on(c, "x") == {"a"}
    assert a.executed_count == 2 and b.executed_count == 0


def test_loose_restriction_to_an_absent_worker_runs_anywhere() -> None:
    c = Cluster()
    c.add_worker("a")
    c.submit("x", 3, restrictions={"x": ["sim://gone"]}, loose_restrictions=["x"])
    c.run_until_idle()
    assert c.result("x") == 3 and holders(c, "x") == {"a"}


def test_strict_restriction_to_an_absent_worker_waits_for_a_worker_of_that_name() -> None:
    c = Cluster()
    c.add_worker("a")
    c.submit("x", 4, restrictions={"x": ["late"]})
    c.run_until_idle()
    assert c.state("x") == "no-worker" and not c.calls
    assert c.reports_of(TaskErredClientMsg) == []
    c.add_worker("late")
    c.run_until_idle()
    assert c.result("x") == 4 and holders(c, "x") == {"late"}


def test_strict_restriction_to_a_lost_worker_waits_until_it_comes_back() -> None:
    c = Cluster()
    c.add_worker("a")
    c.add_worker("b")
    c.submit("x", 5, restrictions={"x": ["a"]})
    c.blocked.add("x")
    c.run_until_idle()
    c.kill_worker("a")
    c.run_until_idle()
    assert c.state("x") == "no-worker"  # b is idle, but x may not run there
    assert c.worker("b").tasks == {}
    c.blocked.clear()
    c.add_worker("a")  # a new worker under the same name
    c.run_until_idle()
    assert c.result("x") == 5 and holders(c, "x") == {"a"}


def test_dependent_placed_where_its_largest_input_is() -> None:
    c = Cluster()
    c.add_worker("a")
    c.add_worker("b")
    c.update_graph({"big": (b"x" * 100_000,), "small": (b"y",),
                    "both": (lambda x, y: len(x) + len(y), "big", "small")},
                   keys=["both"], restrictions={"big": ["b"], "small": ["a"]})
    c.run_until_idle()
    assert c.result("both") == 100_001
    assert ran_on(c, "both") == {"b"}  # moving b"y" is cheaper than moving 100 kB
    assert "big" not in c.worker("a").tasks and not c.worker("a").story("big")


# ----------------------------------------------------------------------------- resources


def test_resources_run_only_where_they_exist_and_one_at_a_time() -> None:
    c = Cluster()
    a = c.add_worker("a", 2)
    b = c.add_worker("b", 2, resources={"GPU": 1})
    keys = [f"gpu-{i}" for i in range(3)]
    c.blocked.update(keys)
    c.update_graph({k: (i,) for i, k in enumerate(keys)}, resources={k: {"GPU": 1} for k in keys})
    c.run_until_idle()
    # b has two threads but one GPU: one runs, the others wait on the worker or the scheduler.
    assert len(b.executing) == 1 and len(a.executing) == 0
    assert b.available_resources == {"GPU": 0}
    for _ in keys:
        running = next(k for k in keys if k in b.tasks and b.tasks[k].state == "executing")
        c.unblock(running)
        c.run_until_idle()
    assert [c.result(k) for k in keys] == [0, 1, 2]
    assert all(holders(c, k) == {"b"} for k in keys) and a.executed_count == 0
    assert b.available_resources == {"GPU": 1}


def test_unsatisfiable_resources_wait_for_a_worker_that_has_them() -> None:
    c = Cluster()
    c.add_worker("a")
    c.submit("x", 6, resources={"x": {"GPU": 2}})
    c.run_until_idle()
    assert c.state("x") == "no-worker" and not c.calls
    c.add_worker("g1", resources={"GPU": 1})
    c.run_until_idle()
    assert c.state("x") == "no-worker"  # one GPU is not two
    c.add_worker("g2", resources={"GPU": 2})
    c.run_until_idle()
    assert c.result("x") == 6 and holders(c, "x") == {"g2"}


# ----------------------------------------------------------------------------- priority


def test_user_priority_orders_work_on_one_thread() -> None:
    c = Cluster()
    c.add_worker("a")
    c.submit("first", 0)
    c.blocked.add("first")
    c.run_until_idle()
    # Two maps submitted back to back reach the scheduler as one update-graph (the
    # client merges its outbox): the worker's second slot goes to the best of both.
    lows = {f"low-{i}": (i,) for i in range(3)}
    highs = {f"high-{i}": (i,) for i in range(3)}
    c.update_graph({**lows, **highs}, user_priority={**dict.fromkeys(lows, -1), **dict.fromkeys(highs, 10)})
    c.run_until_idle()
    c.unblock("first")
    c.run_until_idle()
    assert c.order == ["first", *highs, *lows]  # equal priority: submission order


def test_work_already_on_the_worker_is_not_overtaken_by_later_priority() -> None:
    c = Cluster()
    a = c.add_worker("a")
    c.submit("first", 0)
    c.blocked.add("first")
    c.run_until_idle()
    c.update_graph({f"low-{i}": (i,) for i in range(3)}, user_priority=-1)
    c.run_until_idle()
    # One low task fills the worker's second slot; the others wait in the scheduler's queue.
    assert a.tasks["low-0"].state == "ready"
    assert [c.state(f"low-{i}") for i in (1, 2)] == ["queued", "queued"]
    c.update_graph({"high": (9,)}, user_priority=10)
    c.unblock("first")
    c.run_until_idle()
    assert c.order == ["first", "low-0", "high", "low-1", "low-2"]


def _queued_in_order_of_two_maps(fifo_timeout: float, gap: float, **second: object) -> list:
    """The run order of two 3-task maps sent ``gap`` seconds apart while the one
    thread is busy: the first task of the first map takes the second slot."""
    c = Cluster()
    c.add_worker("a")
    c.submit("first", 0)
    c.blocked.add("first")
    c.run_until_idle()
    c.update_graph({f"a-{i}": (i,) for i in range(3)}, fifo_timeout=fifo_timeout)
    c.run_until_idle()
    c.advance(gap)
    c.update_graph({f"b-{i}": (i,) for i in range(3)}, fifo_timeout=fifo_timeout, **second)
    c.unblock("first")
    c.run_until_idle()
    return c.order


def test_graphs_within_fifo_timeout_share_a_generation_and_interleave() -> None:
    # dask's fifo_timeout: a graph that arrives within it of the start of the current
    # generation joins it; the tasks of both then run by their order within each graph.
    assert _queued_in_order_of_two_maps(0.1, 0.05) == ["first", "a-0", "b-0", "a-1", "b-1", "a-2", "b-2"]


def test_graph_after_fifo_timeout_runs_after_earlier_graphs() -> None:
    order = ["first", "a-0", "a-1", "a-2", "b-0", "b-1", "b-2"]
    assert _queued_in_order_of_two_maps(0.1, 0.5) == order
    assert _queued_in_order_of_two_maps(0.0, 0.001) == order


def test_generation_counts_from_its_start_and_empty_graphs_start_none() -> None:
    c = Cluster()
    c.update_graph({"x": (1,)}, fifo_timeout=1.0)
    gen = c.scheduler.generation
    c.advance(0.6)
    c.update_graph({}, keys=[], fifo_timeout=0.0)  # no tasks: no new generation
    c.update_graph({"y": (1,)}, fifo_timeout=1.0)
    c.advance(0.6)  # 1.2 s after the generation began, 0.6 s after "y"
    c.update_graph({"z": (1,)}, fifo_timeout=1.0)
    c.run_until_idle()
    assert [c.scheduler.tasks[k].priority[1] for k in "xyz"] == [gen, gen, gen + 1]


def test_merged_message_keeps_each_graphs_order() -> None:
    # Graphs sent in one tick leave the client as one message with graph_starts.
    c = Cluster()
    tasks = {**{f"a-{i}": (i,) for i in range(3)}, **{f"b-{i}": (i,) for i in range(2)}}
    c.update_graph(tasks, graph_starts=[0, 3], fifo_timeout=0.1)
    assert [c.scheduler.tasks[k].priority[2] for k in tasks] == [0, 1, 2, 0, 1]


# ----------------------------------------------------------------------------- failures, resubmission


def test_failed_task_runs_again_when_submitted_again() -> None:
    c = Cluster()
    c.add_worker("a")

    def boom() -> None:
        raise ZeroDivisionError("no")

    c.submit("x", boom)
    c.run_until_idle()
    [err] = c.reports_of(TaskErredClientMsg)
    assert isinstance(err.exception, ZeroDivisionError) and c.state("x") == "erred"
    c.submit("x", 7)  # same key, fixed function: tried again, not answered from the error
    c.run_until_idle()
    assert c.result("x") == 7 and c.calls["x"] == 2
    assert [m.key for m in c.reports_of(KeyInMemoryMsg)] == ["x"]


def test_retries_are_per_task_and_exhausted_retries_err() -> None:
    c = Cluster()
    c.add_worker("a")
    c.add_worker("b")
    always = "always"

    def fails() -> None:
        raise RuntimeError(always)

    c.update_graph({"x": (fails,), "y": (fails,)}, retries={"x": 2})
    c.run_until_idle()
    assert c.calls == {"x": 3, "y": 1}
    assert {m.key for m in c.reports_of(TaskErredClientMsg)} == {"x", "y"}
    assert c.scheduler.tasks["x"].retries == 0


def test_error_of_a_dependency_reaches_every_dependent_and_none_runs() -> None:
    c = Cluster()
    c.add_worker("a")
    c.add_worker("b")

    def bad() -> None:
        raise KeyError("k")

    c.update_graph({"x": (bad,), "y": (operator.neg, "x"), "z": (operator.neg, "y"), "ok": (1,)})
    c.run_until_idle()
    assert {k: c.state(k) for k in "xyz"} == {"x": "erred", "y": "erred", "z": "erred"}
    assert c.result("ok") == 1 and set(c.calls) == {"x", "ok"}
    erred = {m.key: m for m in c.reports_of(TaskErredClientMsg)}
    assert set(erred) == {"x", "y", "z"} and all(isinstance(m.exception, KeyError) for m in erred.values())


# ----------------------------------------------------------------------------- cancel, release, forget


def test_cancel_a_finished_result_frees_it_on_the_worker() -> None:
    c = Cluster()
    a = c.add_worker("a")
    c.submit("x", 1)
    c.run_until_idle()
    assert a.data == {"x": 1}
    c.cancel("x")
    c.run_until_idle()
    assert c.state("x") == "forgotten" and a.data == {} and a.tasks == {}
    assert [m.key for m in c.reports_of(CancelledKeyMsg)] == ["x"]


def test_cancel_a_dependency_cancels_its_dependents() -> None:
    c = Cluster()
    a = c.add_worker("a")
    c.update_graph({"x": (1,), "y": (operator.neg, "x")})
    c.blocked.add("x")
    c.run_until_idle()
    c.cancel("x")
    c.run_until_idle()
    c.unblock("x")
    c.run_until_idle()
    assert c.scheduler.tasks == {} and a.tasks == {} and a.data == {}
    assert {m.key for m in c.reports_of(CancelledKeyMsg)} == {"x", "y"}
    assert "y" not in c.calls


def test_cancel_by_one_client_keeps_it_for_another_unless_forced() -> None:
    c = Cluster()
    a = c.add_worker("a")
    c.submit("x", 1, client="c1")
    c.submit("x", 1, client="c2")
    c.run_until_idle()
    c.cancel("x", client="c1")
    c.run_until_idle()
    assert c.state("x") == "memory" and a.data == {"x": 1}
    assert [cs.client_key for cs in c.scheduler.tasks["x"].who_wants] == ["c2"]
    assert [m.key for m in c.reports_of(CancelledKeyMsg, "c1")] == ["x"]
    assert c.reports_of(CancelledKeyMsg, "c2") == []
    c.submit("x", 1, client="c1")
    c.run_until_idle()
    c.cancel("x", client="c1", force=True)
    c.run_until_idle()
    assert c.state("x") == "forgotten" and a.data == {}
    assert [m.key for m in c.reports_of(CancelledKeyMsg, "c2")] == ["x"]
    assert c.calls["x"] == 1


def test_client_close_releases_its_keys_and_keeps_those_another_client_wants() -> None:
    c = Cluster()
    a, b = c.add_worker("a"), c.add_worker("b")
    c.update_graph({f"inc-{i}": (i + 1,) for i in range(6)}, client="c1")
    c.update_graph({"sum": (lambda *xs: sum(xs), *(f"inc-{i}" for i in range(6)))}, client="c1")
    c.submit("inc-0", 1, client="c2")
    c.submit("only2", 2, client="c2")
    c.run_until_idle()
    assert c.result("sum") == 21
    c.remove_client("c1")
    c.run_until_idle()
    assert set(c.scheduler.tasks) == {"inc-0", "only2"}
    assert set(c.scheduler.clients) >= {"c2"} and "c1" not in c.scheduler.clients
    assert set(a.data) | set(b.data) == {"inc-0", "only2"}
    c.remove_client("c2")
    c.run_until_idle()
    assert c.scheduler.tasks == {} and a.data == {} == b.data


def test_releasing_a_running_task_throws_its_late_result_away() -> None:
    c = Cluster()
    a = c.add_worker("a")
    c.submit("x", 1)
    c.blocked.add("x")
    c.run_until_idle()
    c.release("x")
    c.run_until_idle()
    assert c.state("x") == "forgotten"
    c.unblock("x")
    c.run_until_idle()
    assert a.data == {} and a.tasks == {} and c.calls["x"] == 1
    assert c.reports_of(KeyInMemoryMsg) == []


def test_released_key_submitted_again_is_computed_again() -> None:
    c = Cluster()
    a = c.add_worker("a")
    c.submit("x", 1)
    c.run_until_idle()
    c.release("x")
    c.run_until_idle()
    assert a.data == {}
    c.submit("x", 1)
    c.run_until_idle()
    assert c.result("x") == 1 and c.calls["x"] == 2


def test_intermediate_kept_while_a_client_holds_it() -> None:
    c = Cluster()
    a = c.add_worker("a")
    c.update_graph({"x": (1,), "y": (operator.neg, "x")}, keys=["x", "y"])
    c.run_until_idle()
    assert set(a.data) == {"x", "y"}
    c.release("y")
    c.run_until_idle()
    assert a.data == {"x": 1} and c.state("y") == "forgotten"
    c.release("x")
    c.run_until_idle()
    assert c.scheduler.tasks == {} and a.tasks == {}


# ----------------------------------------------------------------------------- scatter


def test_scattered_data_is_used_as_a_dependency() -> None:
    c = Cluster()
    c.add_worker("a")
    c.add_worker("b")
    c.scatter({"s": 20}, "a")
    c.run_until_idle()
    assert c.state("s") == "memory" and holders(c, "s") == {"a"}
    assert [m.key for m in c.reports_of(KeyInMemoryMsg)] == ["s"]
    c.submit("t", lambda v: v + 1, "s", restrictions={"t": ["b"]})
    c.run_until_idle()
    assert c.result("t") == 21 and holders(c, "s") == {"a", "b"}
    assert "s" not in c.calls


def test_losing_the_only_copy_of_scattered_data_errs_it_and_its_dependents() -> None:
    c = Cluster()
    c.add_worker("a")
    c.add_worker("b")
    c.scatter({"s": 1}, "a")
    c.submit("t", operator.neg, "s", restrictions={"t": ["a"]})
    c.blocked.add("t")
    c.run_until_idle()
    c.kill_worker("a")  # no recipe to recompute s from
    c.run_until_idle()
    assert c.state("s") == "erred" and c.state("t") == "erred"
    erred = {m.key: m for m in c.reports_of(TaskErredClientMsg)}
    assert set(erred) == {"s", "t"} and isinstance(erred["s"].exception, ScatteredDataLost)
    assert c.worker("b").tasks == {}


def test_scattered_data_with_a_second_copy_survives_its_worker() -> None:
    c = Cluster()
    c.add_worker("a")
    c.add_worker("b")
    c.scatter({"s": 1}, "a")
    c.run_until_idle()
    c.replicate(["s"], n=2)
    c.kill_worker("a")
    c.run_until_idle()
    assert c.state("s") == "memory" and holders(c, "s") == {"b"}
    assert c.reports_of(TaskErredClientMsg) == []


# ----------------------------------------------------------------------------- replicate, rebalance


def test_replicate_to_every_worker_then_down_to_one() -> None:
    c = Cluster()
    ws = [c.add_worker(n) for n in "abc"]
    c.submit("x", b"data", restrictions={"x": ["a"]})
    c.run_until_idle()
    c.replicate(["x"])
    assert holders(c, "x") == {"a", "b", "c"} and all(w.data["x"] == b"data" for w in ws)
    c.replicate(["x"], n=2)
    assert len(holders(c, "x")) == 2 and sum("x" in w.data for w in ws) == 2
    c.replicate(["x"], n=1)
    assert len(holders(c, "x")) == 1 and sum("x" in w.data for w in ws) == 1
    assert c.calls["x"] == 1
    with pytest.raises(ValueError, match="n must be at least 1"):
        c.replicate(["x"], n=0)


def test_rebalance_evens_bytes_and_then_moves_nothing() -> None:
    c = Cluster()
    a, b = c.add_worker("a"), c.add_worker("b")
    keys = [f"blob-{i}" for i in range(6)]
    c.update_graph({k: (bytes([i]) * 1000,) for i, k in enumerate(keys)},
                   restrictions={k: ["a"] for k in keys})
    c.run_until_idle()
    assert len(a.data) == 6 and not b.data
    c.rebalance()
    assert len(a.data) == 3 and len(b.data) == 3
    sched = c.scheduler.workers
    assert sched[c.address("a")].nbytes == sched[c.address("b")].nbytes
    assert all(len(holders(c, k)) == 1 for k in keys) and set(c.calls.values()) == {1}
    assert elastic.rebalance_plan(c.scheduler) == ([], {})  # balanced: nothing more moves


# ----------------------------------------------------------------------------- losing data, losing workers


def test_dependency_lost_with_its_worker_is_recomputed_for_a_waiting_dependent() -> None:
    c = Cluster()
    c.add_worker("a")
    c.add_worker("b")
    c.update_graph({"x": (2,), "w": (3,), "y": (operator.mul, "x", "w")}, keys=["y"],
                   restrictions={"x": ["a"], "w": ["b"], "y": ["b"]}, loose_restrictions=["x"])
    c.blocked.add("w")
    c.run_until_idle()
    assert c.state("x") == "memory" and c.state("y") == "waiting"
    c.kill_worker("a")
    c.unblock("w")
    c.run_until_idle()
    assert c.result("y") == 6 and c.calls["x"] == 2
    assert c.state("x") == "released"  # recomputed for y only, then dropped


def test_worker_reconnecting_brings_its_results_back() -> None:
    c = Cluster()
    a = c.add_worker("a")
    c.submit("x", 1)
    c.run_until_idle()
    c.reconnect("a")
    c.run_until_idle()
    assert c.state("x") == "memory" and holders(c, "x") == {"a"}
    assert c.calls["x"] == 1  # not recomputed: the worker answered with its copy
    c.submit("y", operator.neg, "x")
    c.run_until_idle()
    assert c.result("y") == -1 and a.executed_count == 2


def test_worker_reconnecting_while_a_task_runs_finishes_it() -> None:
    c = Cluster()
    c.add_worker("a")
    c.submit("x", 1)
    c.blocked.add("x")
    c.run_until_idle()
    c.reconnect("a")
    c.run_until_idle()
    c.unblock("x")
    c.run_until_idle()
    assert c.result("x") == 1
    moves = [(e[1], e[2]) for e in c.scheduler.story("x")]
    assert ("processing", "released") in moves and moves[-1] == ("processing", "memory")
    assert c.calls["x"] == 1  # the worker answered the new compute-task with the running one
