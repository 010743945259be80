"""What ``pip install hpc-cluster`` installs: one top-level package, ``cluster``.

The wheel is built once (module fixture) from a copy of the sources (so the
work tree gets no ``build/``) and installed with ``--no-deps`` into a fresh
virtual environment outside the repository; the environment borrows the
dependencies (jinja2, psutil, cryptography, donfig, ...) of this one through a
``.pth`` line instead of downloading them, and that directory's own ``.pth``
files (our editable install's finder) are not processed, so only the wheel
provides the project.  There, from a directory outside the repository, the
tests check the wheel's top-level names, that ``import runtime`` does not
exist, that the job-script templates, the status page's static files and the
built-in configuration are the installed copies, and run the README's quick
start as it is written (a ``Client()`` with worker processes).

Building uses pip's isolated build environment (setuptools from PyPI, which
this machine and CI reach), unless the project's environment can build a
wheel offline (``wheel`` installed, or setuptools >= 70.1).
"""

from __future__ import annotations

import importlib.metadata
import os
import re
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

INSTALLED = """\
import importlib.util, os
import cluster
from cluster import templates, jobqueue
from cluster.runtime import config
from cluster.jobqueue import SLURMCluster, PBSCluster
for name in ("runtime", "jobqueue", "hpc", "templates"):
    print(name, importlib.util.find_spec(name) is not None)
static = os.path.join(os.path.dirname(cluster.runtime.dashboard.__file__), "static")
print(templates.__file__)
print(jobqueue.__file__)
print(config.__file__)
print(sorted(os.listdir(static)))
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


def _env() -> dict:
    # Without the PYTHONPATH tests/conftest.py sets (the repository root, for
    # worker processes): through it pip would see the work tree's egg-info and
    # take the wheel as installed already, and the fresh environment would
    # import the work tree instead of the wheel.
    return {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}


def _run(argv, **kwargs) -> subprocess.CompletedProcess:
    kwargs.setdefault("env", _env())
    proc = subprocess.run([str(a) for a in argv], capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, **kwargs)
    assert proc.returncode == 0, f"{argv} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
    return proc


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """``(wheel, python of a fresh venv with only the wheel installed, its site dir, a
    directory outside the repository)``."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    src.mkdir()
    for name in SOURCES:
        path = REPO / name
        if path.is_dir():
            shutil.copytree(path, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(path, src / name)
    out = tmp / "dist"
    build = [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", out, src]
    if _can_build_offline():
        build.insert(5, "--no-build-isolation")
    _run(build, timeout=240)
    wheel = next(out.glob("hpc_cluster-*.whl"))
    venv = tmp / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", venv], timeout=60)
    python = venv / "bin" / "python"
    _run([sys.executable, "-m", "pip", "--python", python, "install", "-q", "--no-deps",
          "--no-index", wheel], timeout=120)
    site = _run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                timeout=30).stdout.strip()
    Path(site, "borrowed-deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    elsewhere = tmp / "elsewhere"
    elsewhere.mkdir()
    return wheel, python, site, elsewhere


def test_the_wheel_has_one_top_level_package(installed):
    wheel = installed[0]
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names}
    assert {t for t in top if not t.endswith(".dist-info")} == {"cluster"}
    dist_info = next(t for t in top if t.endswith(".dist-info"))
    top_level = [n for n in names if n == f"{dist_info}/top_level.txt"]
    if top_level:  # (setuptools writes it; it must name only cluster)
        assert zipfile.ZipFile(wheel).read(top_level[0]).decode().split() == ["cluster"]
    assert {"cluster/templates/__init__.py", "cluster/templates/slurm.sh.j2",
            "cluster/templates/pbs.sh.j2", "cluster/templates/sge.sh.j2",
            "cluster/templates/slurm-mpi.sh.j2", "cluster/templates/pbs-mpi.sh.j2",
            "cluster/templates/sge-mpi.sh.j2", "cluster/runtime/scheduler/state.py",
            "cluster/runtime/worker/state.py", "cluster/runtime/config.yaml",
            "cluster/jobqueue/systems/sge.py", "cluster/hpc/launcher.py",
            "cluster/__main__.py"} <= set(names)
    # Every module of the tree is in the wheel (pyproject.toml lists the packages by hand).
    for sub in ("runtime", "hpc", "jobqueue", "templates", "cluster"):
        for path in (REPO / sub).rglob("*.py"):
            rel = path.relative_to(REPO / sub).as_posix()
            inside = f"cluster/{rel}" if sub == "cluster" else f"cluster/{sub}/{rel}"
            assert inside in names, f"{path} is not in the wheel: list its package in pyproject.toml"
    static = {n for n in names if n.startswith("cluster/runtime/dashboard/static/")}
    static_here = {f"cluster/runtime/dashboard/static/{p.name}"
                   for p in (REPO / "runtime" / "dashboard" / "static").iterdir() if p.is_file()}
    assert static == static_here and static


def test_installed_package_is_used_from_outside_the_repository(installed):
    _, python, site, elsewhere = installed
    lines = _run([python, "-I", "-c", INSTALLED], cwd=elsewhere, timeout=60).stdout.splitlines()
    found = dict(line.split() for line in lines[:4])
    assert found == {"runtime": "False", "jobqueue": "False", "hpc": "False", "templates": "False"}
    template_file, jobqueue_file, config_file, static, shipped, *script = lines[4:]
    for path in (template_file, jobqueue_file, config_file):
        assert path.startswith(site), path
    assert static == str(sorted(p.name for p in (REPO / "runtime" / "dashboard" / "static").iterdir()
                                if p.is_file()))
    assert shipped == SHIPPED
    text = "\n".join(script)
    assert "#SBATCH --mem=1908M" in text and "#PBS -l select=1:ncpus=2:mem=1908mb" in text
    # The command every batch job runs, from the installed package.
    assert f"{python} -P -m cluster worker" in text or "-P -m cluster worker" in text


def _readme_quick_start() -> str:
    """The first Python block of the README's "Quick start", as written there."""
    readme = (REPO / "README.md").read_text()
    section = readme.split("## Quick start", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_quick_start_runs_from_the_installed_wheel(installed):
    _, python, site, elsewhere = installed
    code = _readme_quick_start()
    assert "Client()" in code
    proc = _run([python, "-I", "-c", code], cwd=elsewhere, timeout=180)
    assert proc.stdout.strip().splitlines()[-1] == "328350"


def test_editable_install_finds_the_subpackages_in_the_work_tree(tmp_path):
    """The project's own environment (``pip install -e .``) imports them from the work tree,
    as subpackages of ``cluster`` (cluster/__init__.py looks beside itself)."""
    out = _run([sys.executable, "-I", "-c", "from cluster import templates, runtime; "
                "print(templates.__file__); print(runtime.__file__); print(templates.names())"],
               cwd=tmp_path, timeout=60).stdout.splitlines()
    assert out == [str(REPO / "templates" / "__init__.py"), str(REPO / "runtime" / "__init__.py"),
                   SHIPPED]
