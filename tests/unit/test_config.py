"""Configuration files and variables (runtime/config.py): real files in a temporary $HOME, real variables.

The ``config_home`` fixture points ``HOME`` at a temporary directory, moves
``/etc/hpc-cluster`` and ``/etc/dask`` there too, clears every ``DASK_*``,
``HPC_CLUSTER_*`` and ``XDG_*`` variable, and reads the configuration again
before and after the test.
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from cluster.runtime import config
from cluster.runtime.config import FROM_CONFIG, JOBQUEUE_SCHEMA, SCHEMA, ConfigError, ConfigWarning
from cluster.runtime.nanny import Nanny
from cluster.runtime.scheduler.server import Scheduler
from cluster.runtime.worker import Worker

from cluster import cli

pytestmark = pytest.mark.timeout(60)

REPO = Path(__file__).resolve().parents[2]


@dataclass
class Home:
    """The temporary home and the places a test writes configuration to."""

    root: Path
    home: Path
    monkeypatch: pytest.MonkeyPatch

    @property
    def ours(self) -> Path:
        return self.home / ".config" / "hpc-cluster"

    @property
    def dask(self) -> Path:
        return self.home / ".config" / "dask"

    def write(self, path: Path, text: str) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        return path

    def env(self, **values: str) -> None:
        for name, value in values.items():
            self.monkeypatch.setenv(name, value)


@pytest.fixture
def config_home(tmp_path, monkeypatch):
    home = tmp_path / "home"
    home.mkdir()
    for name in list(os.environ):
        if name.startswith(("DASK_", "HPC_CLUSTER_", "XDG_")):
            monkeypatch.delenv(name)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("HPC_CLUSTER_ROOT_CONFIG", str(tmp_path / "etc-hpc-cluster"))
    monkeypatch.setenv("DASK_ROOT_CONFIG", str(tmp_path / "etc-dask"))
    config.refresh()
    yield Home(tmp_path, home, monkeypatch)
    monkeypatch.undo()
    config.refresh()


def worker_fractions(**kwargs) -> tuple:
    """The three memory fractions of an unstarted Worker (nothing listens before it starts)."""
    w = Worker("tcp://127.0.0.1:1", nthreads=1, **kwargs)
    return w.memory_target_fraction, w.memory_spill_fraction, w.memory_pause_fraction


def test_built_in_defaults(config_home):
    assert worker_fractions() == (0.6, 0.7, 0.8)
    s = Scheduler(dashboard_address=None)
    assert (s.state.allowed_failures, s.state.worker_ttl, s.state.idle_timeout) == (3, None, None)
    got = config.settings("worker.")
    assert got["worker.memory.target"].source == "default" and got["worker.memory.target"].default


def test_defaults_file_documents_every_key():
    with open(config.DEFAULTS_FILE, encoding="utf-8") as f:
        text = f.read()
    keys = dict(config.flatten(yaml.safe_load(text)))
    assert {k for k in keys if not k.startswith("jobqueue.")} == set(SCHEMA)
    jobqueue_keys = {k.split(".")[2] for k in keys if k.startswith("jobqueue.")}
    assert jobqueue_keys == set(JOBQUEUE_SCHEMA)
    for key, value in keys.items():  # every default is a value its key accepts
        assert config.kind_of(key).check(value), (key, value)
    for key in SCHEMA:  # and each is explained by a comment on its line
        assert f"{key.split('.')[-1]}:" in text


def test_our_file_sets_values_and_says_where(config_home):
    path = config_home.write(config_home.ours / "site.yaml",
                             "worker:\n  memory:\n    target: 0.5\n    spill: false\n"
                             "scheduler:\n  worker-ttl: 5 minutes\n")
    config.refresh()
    assert worker_fractions() == (0.5, None, 0.8)
    assert Scheduler(dashboard_address=None).state.worker_ttl == 300
    assert config.settings()["worker.memory.target"].source == str(path)
    assert config.settings()["worker.memory.pause"].source == "default"


def test_files_of_one_directory_apply_in_name_order_and_etc_is_below_home(config_home):
    config_home.write(config_home.ours / "a.yaml", "worker: {memory: {target: 0.3, spill: 0.4}}\n")
    config_home.write(config_home.ours / "b.yml", "worker: {memory: {target: 0.35}}\n")
    config_home.write(config_home.root / "etc-hpc-cluster" / "site.yaml",
                      "worker: {memory: {target: 0.1, spill: 0.2, pause: 0.25}}\n")
    config.refresh()
    assert worker_fractions() == (0.35, 0.4, 0.25)


def test_hpc_cluster_config_names_one_more_file_above_the_others(config_home):
    config_home.write(config_home.ours / "a.yaml", "worker: {memory: {target: 0.3}}\n")
    extra = config_home.write(config_home.root / "elsewhere" / "mine.yaml",
                              "worker: {memory: {target: 0.45}}\n")
    config_home.env(HPC_CLUSTER_CONFIG=str(extra))
    config.refresh()
    assert config.settings()["worker.memory.target"].source == str(extra)
    assert worker_fractions()[0] == 0.45


def test_environment_variables(config_home):
    config_home.env(HPC_CLUSTER__WORKER__MEMORY__PAUSE="0.9", HPC_CLUSTER__WORKER__MEMORY__SPILL="false",
                    HPC_CLUSTER__SCHEDULER__ALLOWED_FAILURES="5")
    config.refresh()
    assert worker_fractions() == (0.6, None, 0.9)
    assert Scheduler(dashboard_address=None).state.allowed_failures == 5
    assert (config.settings()["worker.memory.pause"].source
            == "$HPC_CLUSTER__WORKER__MEMORY__PAUSE")


def test_unknown_key_in_our_file_warns_with_the_file_and_the_nearest_key(config_home):
    path = config_home.write(config_home.ours / "typo.yaml",
                             "worker:\n  memory:\n    taget: 0.5\nscheduler:\n  worker_ttl: 10s\n")
    with pytest.warns(ConfigWarning) as record:
        config.refresh()
    messages = [str(w.message) for w in record]
    assert any(str(path) in m and "'worker.memory.taget'" in m
               and "did you mean worker.memory.target" in m for m in messages), messages
    # worker_ttl is worker-ttl (dask's rule: '_' and '-' are the same), so only one warning
    assert len(messages) == 1
    assert Scheduler(dashboard_address=None).state.worker_ttl == 10
    assert worker_fractions()[0] == 0.6


def test_dask_key_in_our_file_says_our_name(config_home):
    config_home.write(config_home.ours / "copied.yaml",
                      "distributed:\n  worker:\n    memory:\n      target: 0.5\n")
    with pytest.warns(ConfigWarning, match="'distributed.worker.memory.target', ignored "
                                           r"\(dask's name of worker.memory.target"):
        config.refresh()


def test_unknown_variable_warns_naming_it(config_home):
    config_home.env(HPC_CLUSTER__WORKER__MEMROY__TARGET="0.5")
    with pytest.warns(ConfigWarning, match="HPC_CLUSTER__WORKER__MEMROY__TARGET.*worker.memroy.target"):
        config.refresh()


def test_wrong_type_is_an_error_naming_file_key_and_accepted_values(config_home):
    path = config_home.write(config_home.ours / "bad.yaml", "worker:\n  memory:\n    pause: lots\n")
    with pytest.raises(ConfigError) as info:
        config.refresh()
    message = str(info.value)
    assert str(path) in message and "worker.memory.pause='lots'" in message
    assert "a fraction in (0, 1], or false/null for off" in message
    again = pickle.loads(pickle.dumps(info.value))  # errors cross processes with their type
    assert type(again) is ConfigError and str(again) == message
    path.write_text("scheduler:\n  allowed-failures: -1\n")
    with pytest.raises(ConfigError, match="allowed-failures=-1: expected a non-negative integer"):
        config.refresh()
    path.write_text("jobqueue:\n  slurm:\n    cores: eight\n")
    with pytest.raises(ConfigError, match=r"jobqueue\.slurm\.cores='eight': expected a positive"):
        config.refresh()


def test_wrong_type_in_a_variable_names_the_variable(config_home):
    config_home.env(HPC_CLUSTER__SCHEDULER__IDLE_TIMEOUT="soon")
    with pytest.raises(ConfigError, match="environment variable HPC_CLUSTER__SCHEDULER__IDLE_TIMEOUT"
                                          ".*idle-timeout='soon': expected a duration"):
        config.refresh()


def test_dask_files_and_variables_are_read_for_the_keys_we_implement(config_home):
    # A distributed.yaml as dask.distributed users write it: most keys are not ours (ignored).
    path = config_home.write(config_home.dask / "distributed.yaml", """
distributed:
  version: 2
  scheduler:
    allowed-failures: 6
    bandwidth: 100000000
    work-stealing: true
  worker:
    memory:
      target: 0.55
      terminate: 0.97
    daemon: true
  comm:
    compression: auto
    timeouts: {connect: 30s, tcp: 30s}
array:
  chunk-size: 128MiB
""")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing of dask's own is warned about
        config.refresh()
    assert worker_fractions()[0] == 0.55
    assert Scheduler(dashboard_address=None).state.allowed_failures == 6
    assert Nanny("tcp://127.0.0.1:1", security=False).memory_terminate_fraction == 0.97
    assert Nanny("tcp://127.0.0.1:1", security=False,
                 memory_terminate_fraction=0.5).memory_terminate_fraction == 0.5
    assert config.settings()["worker.memory.target"].source == (
        f"{path} (distributed.worker.memory.target)")
    assert "comm.timeouts.connect" not in config.settings()
    config_home.env(DASK_DISTRIBUTED__SCHEDULER__ALLOWED_FAILURES="8",
                    DASK_DISTRIBUTED__WORKER__MEMORY__PAUSE="False")
    config.refresh()
    assert Scheduler(dashboard_address=None).state.allowed_failures == 8
    assert worker_fractions() == (0.55, 0.7, None)


def test_dask_config_variable_names_one_more_dask_file(config_home):
    path = config_home.write(config_home.root / "dask-site.yaml",
                             "distributed:\n  scheduler:\n    idle-timeout: 1h\n")
    config_home.env(DASK_CONFIG=str(path))
    config.refresh()
    assert Scheduler(dashboard_address=None).state.idle_timeout == 3600


def test_wrong_type_in_a_dask_file_names_it(config_home):
    path = config_home.write(config_home.dask / "distributed.yaml",
                             "distributed:\n  worker:\n    memory:\n      target: [1]\n")
    with pytest.raises(ConfigError, match=f"{path} \\(distributed.worker.memory.target\\)"):
        config.refresh()


def test_precedence_from_built_in_default_to_constructor_argument(config_home):
    """dask's file < DASK_ variable < our file < HPC_CLUSTER__ variable < config.set() < argument."""
    key = "worker.memory.target"

    def now():
        s = config.settings()[key]
        return s.value, s.source, worker_fractions()[0]

    config.refresh()
    assert now() == (0.6, "default", 0.6)
    dask_file = config_home.write(config_home.dask / "d.yaml",
                                  "distributed: {worker: {memory: {target: 0.1}}}\n")
    config.refresh()
    assert now() == (0.1, f"{dask_file} (distributed.worker.memory.target)", 0.1)
    config_home.env(DASK_DISTRIBUTED__WORKER__MEMORY__TARGET="0.2")
    config.refresh()
    assert now()[0::2] == (0.2, 0.2)
    ours = config_home.write(config_home.ours / "o.yaml", "worker: {memory: {target: 0.3}}\n")
    config.refresh()
    assert now() == (0.3, str(ours), 0.3)
    config_home.env(HPC_CLUSTER__WORKER__MEMORY__TARGET="0.4")
    config.refresh()
    assert now() == (0.4, "$HPC_CLUSTER__WORKER__MEMORY__TARGET", 0.4)
    with config.config.set({key: 0.5}):
        assert now() == (0.5, "config.set()", 0.5)
        assert worker_fractions(memory_target_fraction=0.65)[0] == 0.65
    assert now()[0] == 0.4


def test_cli_flag_and_cluster_variable_beat_the_configuration(config_home, monkeypatch):
    config_home.env(HPC_CLUSTER__SCHEDULER__ALLOWED_FAILURES="5")
    config.refresh()
    seen = []

    async def serve(options):
        seen.append(options)
        return 0

    monkeypatch.setattr(cli, "serve_scheduler", serve)

    def allowed(argv, environ):
        seen.clear()
        assert cli.scheduler_command(argv, environ=environ) == 0
        return Scheduler(**{**seen[0], "dashboard_address": None}).state.allowed_failures

    assert allowed(["--port", "0"], {}) == 5  # the configuration
    assert allowed(["--port", "0"], {"CLUSTER_ALLOWED_FAILURES": "6"}) == 6  # CLUSTER_ variable
    assert allowed(["--port", "0", "--allowed-failures", "7"],
                   {"CLUSTER_ALLOWED_FAILURES": "6"}) == 7  # flag
    assert Scheduler(allowed_failures=9, dashboard_address=None).state.allowed_failures == 9


def test_from_config_pickles_as_itself():
    assert pickle.loads(pickle.dumps(FROM_CONFIG)) is FROM_CONFIG
    assert repr(FROM_CONFIG) == "<from config>"
    assert config.setting("worker.memory.target", 0.25) == 0.25


def run_config_command(home: Home, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cluster", "config", *args], cwd=REPO,
                          env=dict(os.environ), capture_output=True, text=True, timeout=60)


def test_config_command_prints_values_and_sources(config_home):
    ours = config_home.write(config_home.ours / "site.yaml",
                             "worker: {memory: {spill: 0.65, taget: 1}}\n")
    dask_file = config_home.write(config_home.dask / "jobqueue.yaml",
                                  "jobqueue: {slurm: {cores: 8, memory: 16GB}}\n")
    config_home.env(HPC_CLUSTER__SCHEDULER__IDLE_TIMEOUT="1h", DASK_JOBQUEUE__SLURM__QUEUE="debug")
    done = run_config_command(config_home)
    assert done.returncode == 0, done.stderr
    lines = {line.split(":", 1)[0]: line for line in done.stdout.splitlines()
             if not line.startswith("#")}
    assert lines["worker.memory.spill"].endswith(f"# {ours}")
    assert '"16GB"' in lines["jobqueue.slurm.memory"]
    assert lines["jobqueue.slurm.memory"].endswith(f"# {dask_file}")
    assert lines["jobqueue.slurm.queue"].endswith("# $DASK_JOBQUEUE__SLURM__QUEUE")
    assert '"1h"' in lines["scheduler.idle-timeout"]
    assert lines["scheduler.idle-timeout"].endswith("# $HPC_CLUSTER__SCHEDULER__IDLE_TIMEOUT")
    assert lines["worker.memory.pause"].endswith("# default")
    assert "precedence (highest first)" in done.stdout and f"read {ours}" in done.stdout
    assert f"{ours}: unknown configuration key 'worker.memory.taget'" in done.stderr

    done = run_config_command(config_home, "--changed", "worker")
    assert done.returncode == 0
    keys = [line.split(":")[0] for line in done.stdout.splitlines() if not line.startswith("#")]
    assert keys == ["worker.memory.spill"]

    config_home.env(HPC_CLUSTER__WORKER__MEMORY__TARGET="[1, 2]")
    done = run_config_command(config_home)
    assert done.returncode == 1 and done.stdout == ""
    assert ("error: environment variable HPC_CLUSTER__WORKER__MEMORY__TARGET: "
            "worker.memory.target=[1, 2]: expected a fraction") in done.stderr


def test_workers_of_a_local_cluster_read_the_memory_fractions_from_files(config_home):
    from cluster.runtime import Client, LocalCluster

    config_home.write(config_home.ours / "memory.yaml",
                      "worker:\n  memory:\n    target: 0.45\n    pause: 0.85\n")
    config_home.write(config_home.dask / "distributed.yaml",
                      "distributed:\n  worker:\n    memory:\n      spill: 0.55\n")
    config.refresh()

    def fractions(dask_worker):
        return (dask_worker.memory_target_fraction, dask_worker.memory_spill_fraction,
                dask_worker.memory_pause_fraction)

    with LocalCluster(n_workers=1, threads_per_worker=1, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        (got,) = client.run(fractions).values()
    assert tuple(got) == (0.45, 0.55, 0.85)
