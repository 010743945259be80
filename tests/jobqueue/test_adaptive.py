"""The scaling policy and the job table, pure: observations in, decisions out (no sockets)."""

from __future__ import annotations

import logging

import pytest
from cluster.jobqueue.adaptive import (
    Adaptive,
    Decision,
    JobView,
    Observation,
    ScalingPolicy,
    adapt_limits,
)
from cluster.jobqueue.states import JobState
from cluster.jobqueue.tracking import JobTable
from cluster.runtime.scheduler.elastic import AdaptiveSizing

pytestmark = pytest.mark.timeout(10)

P, R, C = JobState.PENDING, JobState.RUNNING, JobState.COMPLETING


def jobs(*specs) -> list[JobView]:
    """``("1", R, 2)`` -> a running job with 2 workers; extra flags "ending"/"closing"."""
    out = []
    for jid, state, workers, *flags in specs:
        out.append(JobView(jid, state, workers, ending="ending" in flags, closing="closing" in flags))
    return out


# ----------------------------------------------------------------------------- submitting


@pytest.mark.parametrize("target, processes, submit", [(0, 1, 0), (1, 1, 1), (5, 2, 3), (4, 4, 1), (9, 4, 3)])
def test_whole_jobs_for_a_target(target, processes, submit):
    assert ScalingPolicy(processes).decide(Observation(target)) == Decision(submit=submit)


def test_pending_jobs_count_so_nothing_is_over_submitted():
    policy = ScalingPolicy(2, mode="adapt")
    obs = Observation(6, jobs(("1", P, 0), ("2", P, 0), ("3", R, 2)))
    assert policy.decide(obs) == Decision()
    assert policy.decide(Observation(8, obs.jobs)) == Decision(submit=1)


def test_ending_and_closing_jobs_are_replaced():
    policy = ScalingPolicy(1)
    obs = Observation(2, jobs(("1", R, 1, "ending"), ("2", R, 1), ("3", R, 1, "closing")))
    assert policy.decide(obs) == Decision(submit=1)


def test_completing_jobs_do_not_count():
    assert ScalingPolicy(1).decide(Observation(1, jobs(("1", C, 0)))) == Decision(submit=1)


def test_limits_in_jobs():
    policy = ScalingPolicy(2, minimum_jobs=1, maximum_jobs=3, mode="adapt")
    assert policy.decide(Observation(0)) == Decision(submit=1)
    assert policy.decide(Observation(100)) == Decision(submit=3)


@pytest.mark.parametrize("args, limits", [
    ((1, None, None, None, None), (0, None)),
    ((2, 3, 10, None, None), (2, 5)),
    ((4, None, 2, None, None), (0, 1)),        # less than one job: one job
    ((4, None, 0, None, None), (0, 0)),
    ((2, None, 10, 1, 3), (1, 3)),              # the stricter limit wins
    ((2, 1, None, 2, None), (2, None)),
])
def test_adapt_limits(args, limits):
    assert adapt_limits(*args) == limits


def test_adapt_limits_refuse_nonsense():
    with pytest.raises(ValueError, match="minimum=-1"):
        adapt_limits(1, -1, None, None, None)
    with pytest.raises(ValueError, match="above the maximum"):
        adapt_limits(1, 5, 2, None, None)


@pytest.mark.parametrize("kwargs, message", [
    ({"mode": "fast"}, "mode='fast'"), ({"processes": 0}, "processes=0"),
    ({"wait_count": 0}, "wait_count=0"), ({"minimum_jobs": 2, "maximum_jobs": 1}, "maximum_jobs=1"),
])
def test_policy_refuses_bad_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ScalingPolicy(**kwargs)


# ----------------------------------------------------------------------------- closing


def test_adapt_closes_whole_idle_jobs_pending_first_after_wait_count():
    policy = ScalingPolicy(2, wait_count=3, mode="adapt")
    obs = Observation(2, jobs(("1", R, 2), ("2", R, 2), ("3", P, 0), ("4", R, 2)),
                      closable=["4", "2"])
    assert policy.decide(obs) == Decision()
    assert policy.decide(obs) == Decision()
    assert policy.decide(obs) == Decision(close=("3", "4", "2"))


def test_adapt_wait_count_restarts_when_load_returns():
    policy = ScalingPolicy(1, wait_count=2, mode="adapt")
    idle = Observation(0, jobs(("1", R, 1)), closable=["1"])
    assert policy.decide(idle) == Decision()
    assert policy.decide(Observation(1, idle.jobs, ["1"])) == Decision()  # load is back
    assert policy.decide(idle) == Decision()
    assert policy.decide(idle) == Decision(close=("1",))


def test_adapt_wait_count_follows_the_same_job():
    policy = ScalingPolicy(1, wait_count=2, mode="adapt")
    js = jobs(("1", R, 1), ("2", R, 1))
    assert policy.decide(Observation(1, js, ["1"])) == Decision()
    assert policy.decide(Observation(1, js, ["2"])) == Decision()  # another job: count anew
    assert policy.decide(Observation(1, js, ["2"])) == Decision(close=("2",))


def test_adapt_never_closes_busy_or_starting_jobs():
    policy = ScalingPolicy(1, mode="adapt")
    obs = Observation(0, jobs(("1", R, 1), ("2", R, 0)), closable=[])
    assert policy.decide(obs) == Decision()


def test_scale_closes_starting_then_idle_then_busy_newest_first():
    policy = ScalingPolicy(1)
    js = jobs(("1", R, 1), ("2", R, 1), ("3", R, 0), ("4", R, 1), ("5", P, 0))
    assert policy.decide(Observation(4, js, ["1"])) == Decision(close=("5",))
    assert policy.decide(Observation(3, js, ["1"])) == Decision(close=("5", "3"))
    assert policy.decide(Observation(2, js, ["1"])) == Decision(close=("5", "3", "1"))
    assert policy.decide(Observation(0, js, ["1"])) == Decision(close=("5", "3", "1", "4", "2"))


def test_closable_list_only_names_counted_jobs():
    policy = ScalingPolicy(1)
    js = jobs(("1", R, 1, "closing"), ("2", R, 1))
    assert policy.decide(Observation(0, js, ["1", "9", "2"])) == Decision(close=("2",))


def test_adapt_closes_jobs_chosen_together_in_one_decision():
    # Job 3 goes idle first; a decision later job 2 too: without holding job 3
    # back, its data could move onto job 2 and then move again.
    policy = ScalingPolicy(2, minimum_jobs=1, wait_count=3, mode="adapt")
    js = jobs(("1", R, 2), ("2", R, 2), ("3", R, 2))
    assert policy.decide(Observation(4, js, ["3"])) == Decision()
    assert policy.decide(Observation(0, js, ["3", "2"])) == Decision()
    assert policy.decide(Observation(0, js, ["3", "2"])) == Decision()  # 3 is ready, 2 is not
    assert policy.decide(Observation(0, js, ["3", "2"])) == Decision(close=("3", "2"))


def test_adapt_holds_a_ready_job_back_at_most_wait_count_more_decisions():
    # Job 2's peer keeps changing (3, 4, 3, ...): job 2 goes alone after 2 * wait_count.
    policy = ScalingPolicy(1, wait_count=2, mode="adapt")
    js = jobs(("1", R, 1), ("2", R, 1), ("3", R, 1), ("4", R, 1))
    peers = ["3", "4", "3", "4"]
    decisions = [policy.decide(Observation(2, js, ["2", peer])) for peer in peers]
    assert decisions == [Decision(), Decision(), Decision(), Decision(close=("2",))]


def test_adapt_never_holds_back_pending_jobs():
    policy = ScalingPolicy(1, wait_count=2, mode="adapt")
    js = jobs(("1", R, 1), ("2", R, 1), ("3", P, 0))
    assert policy.decide(Observation(1, js, [])) == Decision()
    # Job 2 is still counting, yet the pending job 3 (no data) goes as soon as it is ready.
    assert policy.decide(Observation(0, js, ["2"])) == Decision(close=("3",))
    assert policy.decide(Observation(0, js, ["2"])) == Decision(close=("2",))


class _Cluster:
    """Stands in for the cluster ``Adaptive`` keeps a weak reference to."""


def sizing(kept: int, stored: int = 120, target: int = 3) -> AdaptiveSizing:
    return AdaptiveSizing(target=target, work=0, workers=3, busy=0, kept_for_data=kept,
                          stored=stored, limit=300, memory_ratio=2.0)


def test_adaptive_log_says_once_when_idle_workers_are_kept_for_their_data(caplog):
    caplog.set_level(logging.INFO, logger="cluster.jobqueue.adaptive")
    cluster = _Cluster()
    adaptive = Adaptive(cluster, 1.0, 5.0, ScalingPolicy(1, mode="adapt"))
    adaptive.observe(sizing(0, target=0))
    assert not adaptive.log
    for _ in range(3):
        adaptive.observe(sizing(2))  # the same news each decision: said once
    assert len(adaptive.log) == 1
    message = adaptive.log[0][1]
    assert message.startswith("keeping 2 idle workers that could go")
    assert "would not fit" in message and "memory_ratio=2" in message and "240 B" in message
    assert f"adapt: {message}" in caplog.text
    adaptive.observe(sizing(1, stored=100, target=2))  # changed: said again
    adaptive.observe(sizing(0, target=1))  # fits now: nothing to say
    adaptive.observe(sizing(1, stored=100, target=2))
    assert [m.split(":")[0] for _, m in adaptive.log] == [
        "keeping 2 idle workers that could go", "keeping 1 idle worker that could go",
        "keeping 1 idle worker that could go"]


def test_adaptive_log_does_not_count_workers_the_minimum_keeps():
    cluster = _Cluster()
    adaptive = Adaptive(cluster, 1.0, 5.0, ScalingPolicy(1, minimum_jobs=2, mode="adapt"))
    adaptive.observe(sizing(2))  # 3 workers, 2 kept by the minimum anyway
    assert [m.split(":")[0] for _, m in adaptive.log] == ["keeping 1 idle worker that could go"]
    adaptive = Adaptive(cluster, 1.0, 5.0, ScalingPolicy(1, minimum_jobs=3, mode="adapt"))
    adaptive.observe(sizing(2))
    assert not adaptive.log


# ----------------------------------------------------------------------------- the job table


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def table(processes: int = 2, clock=None) -> JobTable:
    def names(jid):
        base = f"w-{jid}"
        return [base] if processes == 1 else [f"{base}-{i}" for i in range(processes)]

    return JobTable(names, normalize=lambda j: j.split(".")[0], name_prefix="w-",
                    clock=clock or Clock())


def test_workers_map_to_jobs_by_name():
    t = table()
    t.add("12")
    t.add("123")
    assert t.job_of("w-12-0") == "12"
    assert t.job_of("w-123-1") == "123"
    assert t.job_of("w-1234-0") is None
    assert t.job_of("other") is None
    t.apply_workers({"w-12-0": ("tcp://a", "running"), "w-12-1": ("tcp://b", "running"),
                     "x": ("tcp://c", "running")})
    assert t.workers() == {"w-12-0": "12", "w-12-1": "12"}
    assert t["12"].state == JobState.RUNNING and t["12"].first_worker is not None
    assert t["123"].state == JobState.PENDING


def test_longer_pbs_ids_in_worker_names_still_match():
    t = table(processes=1)
    t.add("77.pbs01")
    assert t.job_of("w-77.pbs01.example.org") == "77.pbs01"
    assert t.job_of("w-77") == "77.pbs01"


def test_status_updates_and_jobs_that_leave_the_queue():
    clock = Clock()
    t = table(clock=clock)
    for jid in ("1", "2", "3", "4"):
        t.add(jid)
    ended = t.apply_status({"1": ("RUNNING", R), "2": ("PENDING", P)}, ["1", "2", "3", "4"], grace=10)
    assert not ended  # 3 and 4 are new: not yet listed is not gone
    clock.t += 11
    t["4"].cancel_requested = True
    ended = t.apply_status({"1": ("RUNNING", R), "2": ("FAILED", JobState.FAILED)},
                           ["1", "2", "3", "4"], grace=10)
    assert {j.id: j.state for j in ended} == {"2": JobState.FAILED, "3": JobState.UNKNOWN,
                                              "4": JobState.CANCELLED}
    assert t.active_ids() == ["1"]
    assert t.failures_in_a_row == 2  # 2 and 3 never had a worker; 4 was ours to cancel
    t.apply_workers({"w-1-0": ("tcp://a", "running")})
    assert t.failures_in_a_row == 0
    t.apply_workers({})
    ended = t.apply_status({}, ["1"], grace=10)
    assert [(j.id, j.state) for j in ended] == [("1", JobState.DONE)]
    info = t.info()
    assert list(info) == ["1", "2", "3", "4"]
    assert info["1"].started is not None and info["1"].workers == ()


def test_ending_jobs():
    clock = Clock()
    t = table(clock=clock)
    t.add("1")
    t.add("2")
    t.add("3")
    t.apply_workers({"w-1-0": ("a", "running"), "w-2-0": ("b", "running"),
                     "w-3-0": ("c", "running")})
    assert [v.ending for v in t.views(ending_after=100)] == [False, False, False]
    clock.t += 101
    t.add("4")
    t.apply_workers({"w-2-0": ("b", "closing_gracefully"), "w-3-0": ("c", "running"),
                     "w-4-0": ("d", "running")})
    views = {v.id: v for v in t.views(ending_after=100)}
    assert views["1"].ending  # its workers left by themselves
    assert views["2"].ending and views["2"].workers == 0  # retiring at its lifetime
    assert views["3"].ending  # old enough
    assert not views["4"].ending
    assert not any(v.ending for v in t.views(ending_after=None) if v.id in ("3", "4"))
