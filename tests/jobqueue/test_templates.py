"""Job scripts of SLURMCluster and PBSCluster, option by option (pure: no scheduler, no batch system).

An unstarted ``asynchronous=True`` cluster renders its script for a given
scheduler address, so nothing here opens a socket or runs a batch command
(``bash -n`` checks the syntax of a rendered script).
"""

from __future__ import annotations

import os
import pickle
import shlex
import subprocess
import textwrap

import pytest
from cluster.jobqueue import PBSCluster, SLURMCluster, TemplateError
from cluster.jobqueue.job import default_margin, plan_lifetime
from cluster.runtime.process import BOOTSTRAP

pytestmark = pytest.mark.timeout(30)

ADDRESS = "tcp://127.0.0.1:8786"
PY = "/opt/py/bin/python"
#: How a job script runs ``python -m`` without the job's working directory on sys.path.
BOOT = shlex.quote(BOOTSTRAP)


def script(cls, **options) -> str:
    options.setdefault("python", PY)
    return cls(asynchronous=True, **options).job_script(ADDRESS)


def directives(text: str, prefix: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith(prefix)]


# ----------------------------------------------------------------------------- whole scripts


def test_slurm_minimal_script_exactly():
    c = SLURMCluster(cores=1, memory="1GB", python=PY, asynchronous=True)
    creds = c.credentials_file  # secure by default: the workers get a credentials file by path
    assert creds.startswith(os.path.expanduser("~/.hpc-cluster/credentials/hpc-worker-"))
    assert c.job_script(ADDRESS) == textwrap.dedent(f"""\
        #!/usr/bin/env bash
        #SBATCH --job-name=hpc-worker
        #SBATCH --nodes=1
        #SBATCH --ntasks=1
        #SBATCH --cpus-per-task=1
        #SBATCH --mem=954M
        #SBATCH --time=00:30:00

        {PY} -c {BOOT} cluster worker {ADDRESS} --nworkers 1 --nthreads 1 --memory-limit 1GB --nanny --death-timeout 180s --lifetime 1530s --lifetime-stagger 90s --tls-credentials {creds} --name "hpc-worker-${{SLURM_JOB_ID}}"
        """)


def test_slurm_every_option_exactly(tmp_path):
    text = script(
        SLURMCluster, cores=8, memory="16GiB", processes=4, queue="gpu", account="proj42",
        walltime="1-00:00:00", job_name="analysis", log_directory="/scratch/logs",
        job_extra_directives=["--exclusive", "#SBATCH --constraint=haswell"],
        job_directives_skip=["--nodes"], job_script_prologue=["module load python", "cd /work"],
        job_script_epilogue=["echo done"], job_cpu=16, job_mem="40GB", interface="ib0",
        local_directory="/tmp/$USER", worker_extra_args=["--resources", "GPU=1"],
        shebang="#!/bin/bash -l", env={"OMP_NUM_THREADS": "2", "NOTE": "it's here"},
        nanny=False, death_timeout="2m", lifetime="1h", lifetime_stagger="5m", security=False)
    assert text == textwrap.dedent(f"""\
        #!/bin/bash -l
        #SBATCH --job-name=analysis
        #SBATCH --output=/scratch/logs/analysis-%j.out
        #SBATCH --error=/scratch/logs/analysis-%j.err
        #SBATCH --partition=gpu
        #SBATCH --account=proj42
        #SBATCH --ntasks=1
        #SBATCH --cpus-per-task=16
        #SBATCH --mem=38147M
        #SBATCH --time=1-00:00:00
        #SBATCH --exclusive
        #SBATCH --constraint=haswell

        export OMP_NUM_THREADS=2
        export NOTE='it'"'"'s here'
        module load python
        cd /work
        {PY} -c {BOOT} cluster worker {ADDRESS} --nworkers 4 --nthreads 2 --memory-limit 4GiB --no-nanny --death-timeout 120s --lifetime 3600s --lifetime-stagger 300s --local-directory '/tmp/$USER' --interface ib0 --name "analysis-${{SLURM_JOB_ID}}" --resources GPU=1
        echo done
        """)
    path = tmp_path / "job.sh"
    path.write_text(text)
    subprocess.run(["bash", "-n", str(path)], check=True, timeout=10)


def test_pbs_minimal_script_exactly():
    c = PBSCluster(cores=1, memory="1GB", python=PY, asynchronous=True)
    creds = c.credentials_file
    assert c.job_script(ADDRESS) == textwrap.dedent(f"""\
        #!/usr/bin/env bash
        #PBS -N hpc-worker
        #PBS -l select=1:ncpus=1:mem=954mb
        #PBS -l walltime=00:30:00

        {PY} -c {BOOT} cluster worker {ADDRESS} --nworkers 1 --nthreads 1 --memory-limit 1GB --nanny --death-timeout 180s --lifetime 1530s --lifetime-stagger 90s --tls-credentials {creds} --name "hpc-worker-${{PBS_JOBID:-$SLURM_JOB_ID}}"
        """)


def test_pbs_every_option_exactly(tmp_path):
    text = script(
        PBSCluster, cores=36, memory="180GiB", processes=6, queue="workq", project="ABC123",
        walltime="48:00:00", job_name="pbs-w", log_directory="/home/me/logs",
        job_extra_directives=["-V", "-l place=excl"], job_directives_skip=["select="],
        job_script_prologue=["source activate env"], job_script_epilogue=["date"],
        resource_spec="nodes=1:ppn=36", interface="ib0", local_directory="/local",
        worker_extra_args=["--reconnect"], env={"A": "1"}, death_timeout="30s", lifetime=None,
        security=False)
    assert text == textwrap.dedent(f"""\
        #!/usr/bin/env bash
        #PBS -N pbs-w
        #PBS -q workq
        #PBS -A ABC123
        #PBS -l nodes=1:ppn=36
        #PBS -l walltime=48:00:00
        #PBS -o /home/me/logs/
        #PBS -e /home/me/logs/
        #PBS -V
        #PBS -l place=excl

        export A=1
        source activate env
        {PY} -c {BOOT} cluster worker {ADDRESS} --nworkers 6 --nthreads 6 --memory-limit 30GiB --nanny --death-timeout 30s --local-directory /local --interface ib0 --name "pbs-w-${{PBS_JOBID:-$SLURM_JOB_ID}}" --reconnect
        date
        """)
    path = tmp_path / "job.sh"
    path.write_text(text)
    subprocess.run(["bash", "-n", str(path)], check=True, timeout=10)


def test_pbs_default_resource_spec_and_account():
    text = script(PBSCluster, cores=8, memory="8GiB", account="acct", job_directives_skip=["-N"])
    assert directives(text, "#PBS") == [
        "#PBS -A acct", "#PBS -l select=1:ncpus=8:mem=8gb", "#PBS -l walltime=00:30:00"]


# ----------------------------------------------------------------------------- lines and blanks


@pytest.mark.parametrize("cls, prefix", [(SLURMCluster, "#SBATCH"), (PBSCluster, "#PBS")])
def test_no_blank_lines_from_missing_values(cls, prefix):
    text = script(cls, cores=2, memory="2GB", walltime=None)
    lines = text.splitlines()
    assert lines.count("") == 1  # the one separator after the directives
    assert not any(line.rstrip() != line for line in lines)
    assert not any("None" in line or "none" in line for line in lines)
    assert not any("time" in d for d in directives(text, prefix))
    assert "--lifetime" not in text  # no walltime, no walltime-derived lifetime


@pytest.mark.parametrize("cls, prefix, skip, gone", [
    (SLURMCluster, "#SBATCH", ["--mem", "--time"], ["--mem=", "--time="]),
    (SLURMCluster, "#SBATCH", ["--job-name"], ["--job-name"]),
    (PBSCluster, "#PBS", ["walltime"], ["walltime="]),
    (PBSCluster, "#PBS", ["-l"], ["select=", "walltime="]),
])
def test_job_directives_skip_drops_exactly_those_lines(cls, prefix, skip, gone):
    full = directives(script(cls, cores=2, memory="2GB"), prefix)
    kept = directives(script(cls, cores=2, memory="2GB", job_directives_skip=skip), prefix)
    assert kept == [d for d in full if not any(s in d for s in skip)]
    assert not any(g in d for d in kept for g in gone)
    assert len(kept) < len(full)


def test_skip_does_not_touch_extra_directives_or_the_body():
    text = script(SLURMCluster, cores=1, memory="1GB", job_directives_skip=["--mem"],
                  job_extra_directives=["--mem-per-cpu=2G"])
    assert "#SBATCH --mem-per-cpu=2G" in text
    assert "--memory-limit 1GB" in text  # the worker line is not a directive
    assert not any(d.startswith("#SBATCH --mem=") for d in directives(text, "#SBATCH"))


def test_worker_names_carry_the_job_id():
    c = SLURMCluster(cores=4, memory="4GB", processes=2, asynchronous=True, job_name="jq")
    assert c.spec.worker_names("123") == ["jq-123-0", "jq-123-1"]
    c1 = PBSCluster(cores=4, memory="4GB", processes=1, asynchronous=True)
    assert c1.spec.worker_names("7.server") == ["hpc-worker-7.server"]


# ----------------------------------------------------------------------------- user templates


def test_user_template_extends_ours(tmp_path):
    t = tmp_path / "mine.sh.j2"
    t.write_text(textwrap.dedent("""\
        {% extends "slurm.sh.j2" %}
        {% block directives %}
        {{ super() }}
        #SBATCH --qos=high
        #SBATCH --gres=gpu:{{ cores }}
        {% endblock %}
        {% block prologue %}
        echo "starting {{ job_name }}"
        {% endblock %}
        """))
    text = script(SLURMCluster, cores=2, memory="2GB", template=str(t),
                  job_directives_skip=["--qos"], job_script_prologue=["ignored"])
    assert "#SBATCH --gres=gpu:2" in text
    assert "--qos" not in text  # the skip filter wraps the overridden block too
    assert 'echo "starting hpc-worker"' in text
    assert "ignored" not in text
    assert text.splitlines()[0] == "#!/usr/bin/env bash"
    assert f"-c {BOOT} cluster worker" in text


def test_user_template_replaces_ours(tmp_path):
    t = tmp_path / "plain.j2"
    t.write_text("#!/bin/sh\n# {{ job_name }} on {{ cores }} cores\n{{ worker_command }}\n")
    text = script(PBSCluster, cores=3, memory="3GB", processes=3, template=t)
    assert text.startswith("#!/bin/sh\n# hpc-worker on 3 cores\n")
    assert "--nworkers 3 --nthreads 1" in text


def test_user_template_with_an_unknown_value_names_it(tmp_path):
    t = tmp_path / "bad.j2"
    t.write_text("#!/bin/sh\n#SBATCH --reservation={{ reservation }}\n{{ worker_command }}\n")
    with pytest.raises(TemplateError, match="reservation") as info:
        script(SLURMCluster, cores=1, memory="1GB", template=t)
    assert info.value.name == "reservation"
    assert info.value.template == str(t)
    again = pickle.loads(pickle.dumps(info.value))
    assert (again.name, again.template, str(again)) == ("reservation", str(t), str(info.value))


def test_user_template_syntax_error_is_a_template_error(tmp_path):
    t = tmp_path / "broken.j2"
    t.write_text("{% if %}\n")
    with pytest.raises(TemplateError, match="line 1"):
        script(SLURMCluster, cores=1, memory="1GB", template=t)


def test_missing_template_file():
    with pytest.raises(ValueError, match="template=.*no such file"):
        SLURMCluster(cores=1, memory="1GB", template="/nonexistent/x.j2", asynchronous=True)


def test_unstarted_cluster_needs_an_address():
    with pytest.raises(RuntimeError, match="no scheduler yet"):
        SLURMCluster(cores=1, memory="1GB", asynchronous=True).job_script()


# ----------------------------------------------------------------------------- bad options


@pytest.mark.parametrize("options, message", [
    ({}, "cores and memory are required"),
    ({"cores": 4}, "memory is required"),
    ({"memory": "4GB"}, "cores is required"),
    ({"cores": 0, "memory": "4GB"}, "cores=0"),
    ({"cores": 4, "memory": "lots"}, "memory='lots'"),
    ({"cores": 4, "memory": "4GB", "processes": 8}, "processes=8 is more than cores=4"),
    ({"cores": 8, "memory": "4GB", "processes": 3}, "not a multiple of processes=3"),
    ({"cores": 4, "memory": "4GB", "job_name": "my job"}, "job_name='my job'"),
    ({"cores": 4, "memory": "4GB", "walltime": 60}, "walltime=60"),
    ({"cores": 4, "memory": "4GB", "queue": "a\nb"}, "queue="),
    ({"cores": 4, "memory": "4GB", "env": {"1BAD": "x"}}, "env: '1BAD'"),
    ({"cores": 4, "memory": "4GB", "shebang": "bash"}, "shebang='bash'"),
    ({"cores": 4, "memory": "4GB", "job_cpu": 0}, "job_cpu=0"),
    ({"cores": 4, "memory": "4GB", "job_mem": "x"}, "job_mem='x'"),
    ({"cores": 4, "memory": "4GB", "death_timeout": "soon"}, "death_timeout='soon'"),
    ({"cores": 4, "memory": "4GB", "status_interval": 0}, "status_interval=0"),
    ({"cores": 4, "memory": "4GB", "n_workers": -1}, "n_workers=-1"),
    ({"cores": 4, "memory": "4GB", "walltime": "00:01:00", "lifetime_margin": "50s"},
     "lifetime_margin='50s'"),
])
def test_bad_options_are_named(options, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("[", r"\[")):
        SLURMCluster(asynchronous=True, **options)


@pytest.mark.parametrize("options, message", [
    ({"job_extra_directives": "--exclusive"}, "job_extra_directives='--exclusive'"),
    ({"worker_extra_args": [1]}, "worker_extra_args"),
    ({"nanny": "yes"}, "nanny='yes'"),
    ({"env": ["A=1"]}, "env="),
    ({"scheduler_options": "host"}, "scheduler_options="),
])
def test_bad_option_types_are_named(options, message):
    with pytest.raises(TypeError, match=message):
        SLURMCluster(cores=1, memory="1GB", asynchronous=True, **options)


def test_pbs_project_and_account_are_one_option():
    assert "#PBS -A p" in script(PBSCluster, cores=1, memory="1GB", project="p")
    with pytest.raises(ValueError, match="project='p' and account='q'"):
        PBSCluster(cores=1, memory="1GB", project="p", account="q", asynchronous=True)


def test_default_processes_about_sqrt_cores():
    assert SLURMCluster(cores=16, memory="1GB", asynchronous=True).spec.processes == 4
    assert SLURMCluster(cores=12, memory="1GB", asynchronous=True).spec.processes == 3
    assert SLURMCluster(cores=7, memory="1GB", asynchronous=True).spec.processes == 1


# ----------------------------------------------------------------------------- lifetimes


@pytest.mark.parametrize("walltime, margin", [
    (120, 30), (600, 60), (1800, 180), (3600, 300), (43200, 300), (60, 15),
])
def test_default_margin(walltime, margin):
    assert default_margin(walltime) == margin


def test_walltime_derived_lifetime():
    life = plan_lifetime(3600)
    assert (life.lifetime, life.stagger, life.margin, life.ours) == (3150, 150, 300, True)
    # every worker retires between W - M - 2S and W - M
    assert life.lifetime - life.stagger == 3000 and life.lifetime + life.stagger == 3300
    assert life.ending_after < life.lifetime - life.stagger
    short = plan_lifetime(120)
    assert (short.lifetime, short.stagger) == (75, 15)


def test_users_own_lifetime_wins():
    life = plan_lifetime(3600, worker_extra_args=["--lifetime", "20m", "--lifetime-stagger=1m"])
    assert (life.lifetime, life.stagger, life.ours) == (1200, 60, False)
    text = script(SLURMCluster, cores=1, memory="1GB",
                  worker_extra_args=["--lifetime", "20m"])
    assert text.count("--lifetime") == 1
    assert plan_lifetime(3600, lifetime=None).lifetime is None
    assert plan_lifetime(None).lifetime is None
    explicit = plan_lifetime(3600, lifetime="10m")
    assert (explicit.lifetime, explicit.stagger) == (600, 0)
