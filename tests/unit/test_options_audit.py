"""Every option of Worker, Nanny, Scheduler and LocalCluster takes effect or is refused
(issue 13: no option accepted and then ignored).

``AUDIT`` says, per class and parameter, which it is: ``"effect"`` (with where the
effect is tested or implemented), ``("refused", value)`` (a value other than the
default, which must raise ``TypeError`` naming the option), or ``"ignored"`` --
only ``loop``, which dask.distributed itself no longer uses, documented as such
in the class's docstring.  A parameter added to a signature without an entry
here fails :func:`test_every_parameter_is_audited`.
"""

from __future__ import annotations

import inspect

import pytest
from cluster.runtime.local import LocalCluster
from cluster.runtime.nanny import Nanny
from cluster.runtime.scheduler.server import Scheduler
from cluster.runtime.worker import Worker

pytestmark = pytest.mark.timeout(60)

E = "effect"

AUDIT: dict[type, dict[str, object]] = {
    Worker: {
        "scheduler_ip": E, "scheduler_port": E, "scheduler_file": E, "ncores": E, "nthreads": E,
        "loop": "ignored", "local_dir": E, "local_directory": E,
        "services": ("refused", {"dashboard": object}), "service_ports": ("refused", {"dashboard": 1}),
        "service_kwargs": ("refused", {"dashboard": {}}), "name": E, "reconnect": E,
        "memory_limit": E, "executor": E,  # test_plugins_preload: executor
        "resources": E, "silence_logs": E, "death_timeout": E, "preload": E, "preload_argv": E,
        "security": E, "contact_address": E, "memory_monitor_interval": E,
        "extensions": E, "metrics": E,  # test_plugins_preload
        "startup_information": ("refused", {"x": len}), "data": E, "interface": E, "host": E,
        "port": E, "protocol": E, "dashboard_address": E, "nanny": E, "plugins": E,
        "low_level_profiler": ("refused", True), "validate": E,
        "profile_cycle_interval": ("refused", "10ms"), "lifetime": E, "lifetime_stagger": E,
        "lifetime_restart": E, "heartbeat_interval": E, "dashboard": E, "profile": E,
        "transfer_incoming_count_limit": E, "memory_target_fraction": E,
        "memory_spill_fraction": E, "memory_pause_fraction": E, "blocked_handlers": E,
    },
    Nanny: {
        "scheduler_ip": E, "scheduler_port": E, "scheduler_file": E, "worker_port": E,
        "nthreads": E, "ncores": E, "loop": "ignored", "local_directory": E,
        "services": ("refused", {"dashboard": object}), "name": E, "memory_limit": E,
        "reconnect": E, "validate": E, "quiet": E, "resources": E, "silence_logs": E,
        "death_timeout": E, "preload": E, "preload_argv": E, "security": E,
        "contact_address": E, "listen_address": E, "worker_class": E, "env": E, "interface": E,
        "host": E, "port": E, "protocol": E, "memory_terminate_fraction": E,
        "memory_monitor_interval": E, "preload_nanny": E, "preload_nanny_argv": E,
    },
    Scheduler: {
        "loop": "ignored", "delete_interval": ("refused", "2s"),
        "synchronize_worker_interval": ("refused", "5s"),
        "services": ("refused", {"dashboard": object}), "service_kwargs": ("refused", {"x": {}}),
        "allowed_failures": E, "extensions": E, "validate": E, "scheduler_file": E, "security": E,
        "worker_ttl": E, "idle_timeout": E, "interface": E, "host": E, "port": E, "protocol": E,
        "dashboard_address": E, "preload": E, "preload_argv": E, "blocked_handlers": E,
    },
    LocalCluster: {
        "n_workers": E, "threads_per_worker": E, "processes": E, "loop": "ignored",
        "start": ("refused", False), "host": E, "ip": E, "scheduler_port": E, "silence_logs": E,
        "dashboard_address": E, "worker_dashboard_address": E, "diagnostics_port": E,
        "services": ("refused", {"dashboard": object}),
        "worker_services": ("refused", {"dashboard": object}),
        "service_kwargs": ("refused", {"x": {}}), "asynchronous": E, "security": E,
        "protocol": E, "blocked_handlers": E, "interface": E, "worker_class": E,
        "scheduler_kwargs": E, "scheduler_sync_interval": ("refused", 5), "memory_limit": E,
        "validate": E, "nanny": E,
    },
}


def _parameters(cls: type) -> list[str]:
    return [n for n, p in inspect.signature(cls.__init__).parameters.items()
            if n != "self" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)]


@pytest.mark.parametrize("cls", list(AUDIT), ids=lambda c: c.__name__)
def test_every_parameter_is_audited(cls):
    params = _parameters(cls)
    assert sorted(set(params) - set(AUDIT[cls])) == [], "parameters missing from the audit"
    assert sorted(set(AUDIT[cls]) - set(params)) == [], "audited parameters that no longer exist"


@pytest.mark.parametrize("cls", list(AUDIT), ids=lambda c: c.__name__)
def test_ignored_parameters_are_documented(cls):
    doc = inspect.getdoc(cls) or ""
    for name, status in AUDIT[cls].items():
        if status == "ignored":
            line = next((ln for ln in doc.splitlines() if ln.strip().startswith(f"{name}:")), "")
            assert "ignored" in line, f"{cls.__name__}({name}=) is ignored but not documented as such"


def _make(cls: type, **kwargs):
    if cls is LocalCluster:
        return LocalCluster(n_workers=0, dashboard_address=None, **kwargs)
    if cls is Scheduler:
        return Scheduler(dashboard_address=None, **kwargs)
    return cls("tcp://127.0.0.1:1", **kwargs)  # made, never started: nothing listens


REFUSED = [(cls, name, status[1]) for cls, table in AUDIT.items() for name, status in table.items()
           if isinstance(status, tuple)]


@pytest.mark.parametrize("cls,name,value", REFUSED, ids=[f"{c.__name__}-{n}" for c, n, _ in REFUSED])
def test_refused_options_name_themselves(cls, name, value):
    with pytest.raises(TypeError, match=rf"{name}=.*not supported"):
        _make(cls, **{name: value})


@pytest.mark.parametrize("cls", [Worker, Nanny, Scheduler], ids=lambda c: c.__name__)
def test_refused_options_at_their_defaults_are_accepted(cls):
    refused = {n: inspect.signature(cls.__init__).parameters[n].default
               for n, s in AUDIT[cls].items() if isinstance(s, tuple)}
    server = _make(cls, **refused)
    assert server.status == "created"


def test_unknown_options_are_refused_by_name():
    with pytest.raises(TypeError, match="no_such_option"):
        Worker("tcp://127.0.0.1:1", no_such_option=1)
    with pytest.raises(TypeError, match="no_such_option"):
        Scheduler(no_such_option=1)
    with pytest.raises(TypeError, match="no_such_option"):
        Nanny("tcp://127.0.0.1:1", no_such_option=1)
    with pytest.raises(TypeError, match="no_such_option"):
        LocalCluster(n_workers=0, no_such_option=1)


def test_option_values_that_cannot_work_are_refused():
    with pytest.raises(TypeError, match="ThreadPoolExecutor"):
        Worker("tcp://127.0.0.1:1", executor="processes")
    with pytest.raises(ValueError, match="worker_class"):
        LocalCluster(n_workers=0, worker_class=dict, dashboard_address=None)
    with pytest.raises(ValueError, match="processes=True"):
        LocalCluster(n_workers=0, worker_class=Nanny, processes=False, dashboard_address=None)
    with pytest.raises(TypeError, match="diagnostics_port"):
        LocalCluster(n_workers=0, dashboard_address=":0", diagnostics_port=":0")
    with pytest.raises(TypeError, match="JSON"):
        Nanny("tcp://127.0.0.1:1", plugins=[object()])  # cannot reach the worker process
