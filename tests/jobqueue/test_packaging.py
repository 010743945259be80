"""The job-script templates ship inside the installed package (wheel and editable install).

``test_wheel_carries_the_templates`` builds a wheel from a copy of the
sources (so the work tree gets no ``build/``), installs it with ``--no-deps``
into a fresh virtual environment, and renders a job script there from a
directory outside the repository: the templates must come from the installed
copy.  Building uses pip's isolated build environment (setuptools from PyPI,
which this machine and CI reach), unless the project's environment can build
a wheel offline (``wheel`` installed, or setuptools >= 70.1).
"""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(300)

REPO = Path(__file__).resolve().parents[2]
SOURCES = ["pyproject.toml", "README.md", "cluster", "runtime", "hpc", "jobqueue", "templates"]

SHIPPED = ("['pbs-mpi.sh.j2', 'pbs.sh.j2', 'sge-mpi.sh.j2', 'sge.sh.j2', 'slurm-mpi.sh.j2', "
           "'slurm.sh.j2']")

RENDER = """\
import sys, templates, jobqueue
from jobqueue import SLURMCluster, PBSCluster
print(templates.__file__)
print(jobqueue.__file__)
print(templates.names())
print(SLURMCluster(cores=2, memory="2GB", asynchronous=True).job_script("tcp://127.0.0.1:8786"))
print(PBSCluster(cores=2, memory="2GB", asynchronous=True).job_script("tcp://127.0.0.1:8786"))
"""


def _can_build_offline() -> bool:
    try:
        importlib.metadata.version("wheel")
        return True
    except importlib.metadata.PackageNotFoundError:
        pass
    version = tuple(int(p) for p in importlib.metadata.version("setuptools").split(".")[:2])
    return version >= (70, 1)


def _run(argv, **kwargs) -> subprocess.CompletedProcess:
    # Without the PYTHONPATH tests/conftest.py sets (the repository root, for
    # worker processes): through it pip would see the work tree's egg-info
    # and take the wheel as installed already.
    kwargs.setdefault("env", {k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    proc = subprocess.run([str(a) for a in argv], capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, **kwargs)
    assert proc.returncode == 0, f"{argv} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
    return proc


def test_wheel_carries_the_templates(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for name in SOURCES:
        path = REPO / name
        if path.is_dir():
            shutil.copytree(path, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(path, src / name)
    out = tmp_path / "dist"
    build = [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", out, src]
    if _can_build_offline():
        build.insert(5, "--no-build-isolation")
    _run(build, timeout=240)
    wheel = next(out.glob("hpc_cluster-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert {"templates/__init__.py", "templates/slurm.sh.j2", "templates/pbs.sh.j2",
            "templates/slurm-mpi.sh.j2", "templates/pbs-mpi.sh.j2", "templates/sge.sh.j2",
            "templates/sge-mpi.sh.j2", "runtime/scheduler/state.py", "runtime/worker/state.py",
            "jobqueue/systems/sge.py"} <= set(names)

    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", venv], timeout=60)
    python = venv / "bin" / "python"
    _run([sys.executable, "-m", "pip", "--python", python, "install", "-q", "--no-deps",
          "--no-index", wheel], timeout=120)
    # The fresh environment borrows the dependencies (jinja2, psutil, ...) of
    # this one through a .pth line; that directory's own .pth files (our
    # editable install's finder) are not processed, so only the wheel provides
    # the project's packages.
    site = _run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                timeout=30).stdout.strip()
    Path(site, "borrowed-deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    lines = _run([python, "-I", "-c", RENDER], cwd=elsewhere, env=env, timeout=60).stdout
    template_file, jobqueue_file, shipped, *script = lines.splitlines()
    assert template_file.startswith(site) and jobqueue_file.startswith(site)
    assert shipped == SHIPPED
    text = "\n".join(script)
    assert "#SBATCH --mem=1908M" in text and "#PBS -l select=1:ncpus=2:mem=1908mb" in text


def test_editable_install_finds_the_templates(tmp_path):
    """The project's own environment (``pip install -e .``) imports them from the work tree."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = _run([sys.executable, "-I", "-c", "import templates; print(templates.__file__); "
                "print(templates.names())"], cwd=tmp_path, env=env, timeout=60).stdout.splitlines()
    assert out == [str(REPO / "templates" / "__init__.py"), SHIPPED]
