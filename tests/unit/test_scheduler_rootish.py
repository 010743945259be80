"""Root-ish tasks: many siblings reading a few shared inputs are queued like root tasks.

Pure state-machine tests (no sockets): the scheduler must not hand every chunk
sliced from one array to the worker that holds the array at once (the reason a
reduction over more data than memory streams), while tasks with many distinct
inputs (a matmul's blocks) still go straight to the worker holding their data.
"""

from __future__ import annotations

from cluster.runtime.scheduler import validation
from cluster.runtime.scheduler.events import (
    AddWorkerEvent,
    RemoveWorkerEvent,
    TaskFinishedEvent,
    UpdateGraphEvent,
)
from cluster.runtime.scheduler.records import ComputeTaskMsg
from cluster.runtime.scheduler.state import SchedulerState

A = "tcp://10.0.0.1:1001"
B = "tcp://10.0.0.2:1002"
SPEC = b"spec"


def computes(msgs) -> dict:
    return {m.key: m.worker for m in msgs if isinstance(m, ComputeTaskMsg)}


def two_workers() -> SchedulerState:
    state = SchedulerState(validate=True, clock=lambda: 1000.0)
    state.handle(AddWorkerEvent(A, nthreads=1))
    state.handle(AddWorkerEvent(B, nthreads=1))
    return state


def test_chunks_of_one_array_are_queued_not_piled_on_its_holder():
    state = two_workers()
    state.handle(UpdateGraphEvent("c", {"array": SPEC}, ["array"]))
    state.handle(TaskFinishedEvent("array", A, nbytes=10_000_000))
    chunks = [("chunk", i) for i in range(40)]
    out = state.handle(UpdateGraphEvent("c", dict.fromkeys(chunks, SPEC), chunks,
                             dependencies={k: ["array"] for k in chunks}))
    placed = computes(out)
    # Two per thread on each worker, not forty on the array's holder.
    assert len(placed) == 4
    assert sorted(placed.values()) == [A, A, B, B]
    assert sum(state.tasks[k].state == "queued" for k in chunks) == 36
    assert all(state.tasks[k].rootish for k in chunks)
    # As chunks finish, queued ones follow, in priority order.
    first = min(placed, key=lambda k: state.tasks[k].priority)
    out = state.handle(TaskFinishedEvent(first, placed[first], nbytes=1000))
    assert len(computes(out)) == 1


def test_tasks_with_many_distinct_inputs_are_not_rootish():
    state = two_workers()
    inputs = [("x", i) for i in range(20)]
    pending = computes(state.handle(UpdateGraphEvent("c", dict.fromkeys(inputs, SPEC), inputs)))
    while pending:  # run the inputs (root tasks, queued) to completion
        key, worker = next(iter(pending.items()))
        del pending[key]
        pending.update(computes(state.handle(TaskFinishedEvent(key, worker, nbytes=1000))))
    assert all(state.tasks[k].state == "memory" for k in inputs)
    products = [("p", i) for i in range(20)]
    deps = {("p", i): [("x", i), ("x", (i + 1) % 20)] for i in range(20)}
    out = state.handle(UpdateGraphEvent("c", dict.fromkeys(products, SPEC), products, dependencies=deps))
    assert not any(state.tasks[k].rootish for k in products)
    assert len(computes(out)) == 20  # all placed by data locality at once


def test_small_groups_are_not_rootish():
    state = two_workers()
    state.handle(UpdateGraphEvent("c", {"array": SPEC}, ["array"]))
    state.handle(TaskFinishedEvent("array", A, nbytes=1000))
    chunks = [("chunk", i) for i in range(4)]
    out = state.handle(UpdateGraphEvent("c", dict.fromkeys(chunks, SPEC), chunks,
                             dependencies={k: ["array"] for k in chunks}))
    assert not any(state.tasks[k].rootish for k in chunks)
    assert set(computes(out).values()) == {A}  # next to their input


def test_queued_rootish_task_waits_again_when_its_input_is_lost():
    state = two_workers()
    state.handle(UpdateGraphEvent("c", {"array": SPEC}, ["array"]))
    state.handle(TaskFinishedEvent("array", A, nbytes=1000))
    chunks = [("chunk", i) for i in range(40)]
    state.handle(UpdateGraphEvent("c", dict.fromkeys(chunks, SPEC), chunks,
                       dependencies={k: ["array"] for k in chunks}))
    queued = [k for k in chunks if state.tasks[k].state == "queued"]
    assert queued
    state.handle(RemoveWorkerEvent(A))  # the only copy of the input is gone
    assert state.tasks["array"].state in ("processing", "queued", "waiting")
    assert all(state.tasks[k].state == "waiting" for k in queued)
    validation.validate_state(state)
