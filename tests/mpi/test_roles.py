"""Pure tests of hpc.roles: which rank runs what, and where the scheduler listens (no MPI)."""

from __future__ import annotations

import pytest
from cluster.hpc.roles import (
    Kind,
    Role,
    RoleOptions,
    expected_workers,
    role,
    scheduler_host,
    worker_name,
    worker_ranks,
)


def test_service_mode_rank0_is_scheduler_others_are_workers_named_after_rank():
    roles = [role(r, 4) for r in range(4)]
    assert roles[0] == Role(Kind.SCHEDULER, 0, 4)
    assert roles[0].is_scheduler and not roles[0].runs_script
    for r in (1, 2, 3):
        assert roles[r] == Role(Kind.WORKER, r, 4, name=str(r))
        assert roles[r].is_worker and not roles[r].is_client


def test_script_mode_rank0_also_runs_the_script():
    opts = RoleOptions(script=True)
    assert role(0, 3, opts) == Role(Kind.SCHEDULER, 0, 3, runs_script=True)
    assert role(1, 3, opts).is_worker and not role(1, 3, opts).runs_script


def test_single_rank_is_a_scheduler_without_workers():
    assert role(0, 1, RoleOptions(script=True)).is_scheduler
    assert worker_ranks(1) == []
    assert expected_workers(1, RoleOptions(script=True)) == {}


def test_name_prefix():
    assert role(5, 8, RoleOptions(name="node")).name == "node-5"
    assert worker_name(2) == "2"
    assert worker_name(2, "") == "2"
    assert worker_name(2, "w") == "w-2"


def test_initialize_mode_rank1_is_the_client():
    opts = RoleOptions(initialize=True)
    assert role(0, 4, opts) == Role(Kind.SCHEDULER, 0, 4)
    assert role(1, 4, opts) == Role(Kind.CLIENT, 1, 4, runs_script=True)
    assert role(1, 4, opts).is_client
    assert role(2, 4, opts) == Role(Kind.WORKER, 2, 4, name="2")
    assert expected_workers(4, opts) == {2: "2", 3: "3"}
    assert worker_ranks(8, opts) == list(range(2, 8))


def test_initialize_mode_needs_three_ranks():
    with pytest.raises(ValueError, match="at least 3"):
        role(0, 2, RoleOptions(initialize=True))


def test_modes_exclude_each_other():
    with pytest.raises(ValueError, match="exclude"):
        role(0, 4, RoleOptions(script=True, initialize=True))


@pytest.mark.parametrize("rank,size", [(-1, 4), (4, 4), (0, 0), (True, 4), (0, 2.0), ("1", 4)])
def test_bad_rank_or_size(rank, size):
    with pytest.raises(ValueError):
        role(rank, size)


def test_every_rank_has_exactly_one_role_and_worker_names_are_unique():
    for size in range(1, 20):
        for opts in (RoleOptions(), RoleOptions(script=True), RoleOptions(name="x")):
            roles = [role(r, size, opts) for r in range(size)]
            assert sum(r.is_scheduler for r in roles) == 1
            names = [r.name for r in roles if r.is_worker]
            assert len(names) == len(set(names)) == size - 1
            assert sum(r.runs_script for r in roles) == (1 if opts.script else 0)


def test_role_is_pure():
    assert role(3, 7, RoleOptions(name="a")) == role(3, 7, RoleOptions(name="a"))


def test_scheduler_host_precedence():
    names = ["n1", "n2"]
    assert scheduler_host(2, names, host="h", interface_address="10.0.0.1") == "10.0.0.1"
    assert scheduler_host(2, names, host="h") == "h"


def test_scheduler_host_loopback_on_one_node():
    assert scheduler_host(1, []) == "127.0.0.1"
    assert scheduler_host(4, ["vm"] * 4) == "127.0.0.1"


def test_scheduler_host_routable_across_nodes():
    assert scheduler_host(3, ["a", "a", "b"]) is None


def test_scheduler_host_checks_names():
    with pytest.raises(ValueError, match="one per rank"):
        scheduler_host(3, ["a", "b"])
