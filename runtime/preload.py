"""Preloads: user code run as a server starts and stops (dask.distributed's ``--preload``).

``Scheduler(preload=...)``, ``Worker(preload=...)`` and ``Nanny(preload_nanny=...)``
(``Nanny(preload=...)`` goes to its worker) take one preload or a list.  Each
is, as in dask.distributed:

* a **module name** (``"mypackage.setup"``): imported the ordinary way;
* a **path to a Python file** (``"/home/me/setup.py"``): run as a module named
  after the file (``setup``), which is put in ``sys.modules`` so that tasks can
  ``import setup`` on that worker;
* **Python source text** (anything else, e.g. ``"def dask_setup(worker): ..."``).

The module is loaded when the server is made, so a preload that fails to
import fails the constructor.  ``dask_setup(server)`` (if the module has one;
it may be ``async def``) runs when the server starts, after it listens and
before a worker registers with its scheduler; ``dask_teardown(server)`` when it
closes.  ``preload_argv`` gives a preload its command-line arguments: a
``dask_setup`` that is a click command is called with the options click parses
from them (its own ``make_context``: we do not import click); a plain function
gets no arguments, so ``preload_argv`` with one is refused.

**Shared machines.**  A preload file runs as you: one that another user could
have written or replaced is refused (:class:`~cluster.runtime.errors.UnsafePathError`),
as SECURITY.md says.  The file is opened without following symbolic links and
checked after opening (regular file, owned by you or root, not writable by
group or others); what runs is what was checked.  URLs are refused: we never
download code.
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import importlib
import logging
import os
import stat
import sys
import types
from collections.abc import Sequence
from typing import Any

from .errors import UnsafePathError

logger = logging.getLogger(__name__)


def _read_safe_source(path: str) -> str:
    """The text of the preload file ``path``, if nobody but us (or root) can have written it.

    Raises:
        UnsafePathError: a symbolic link, not a regular file, another owner, or
            writable by group or others.
        FileNotFoundError / OSError: it cannot be opened.
    """
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise UnsafePathError(f"preload file {path}: it is a symbolic link; refusing to run it "
                                  "(name the file itself)") from None
        raise
    with os.fdopen(fd, "r", encoding="utf-8") as f:
        st = os.fstat(f.fileno())
        mode = stat.S_IMODE(st.st_mode)
        problem = None
        if not stat.S_ISREG(st.st_mode):
            problem = "it is not a regular file"
        elif st.st_uid not in (os.geteuid(), 0):
            problem = f"it belongs to user id {st.st_uid}, not to us (user id {os.geteuid()}) or root"
        elif mode & 0o022:
            problem = f"{'everyone' if mode & 0o002 else 'its group'} can write to it (mode {mode:04o})"
        if problem:
            raise UnsafePathError(f"preload file {path}: {problem}; refusing to run it (another "
                                  "user could change what it runs as you: chmod go-w it, or "
                                  "copy it to a directory of yours)")
        return f.read()


def _is_module_name(text: str) -> bool:
    return bool(text) and all(part.isidentifier() for part in text.split("."))


def load_preload(name: str) -> types.ModuleType:
    """The module of one preload: imported by name, run from a file, or made from source text.

    Raises:
        ValueError: a URL, or an empty name.
        UnsafePathError: a file others could have written.
        ImportError / SyntaxError / OSError: it does not load.
    """
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"preload {name!r}: expected a module name, a .py file or Python source")
    stripped = name.strip()
    if stripped.startswith(("http://", "https://")):
        raise ValueError(f"preload {stripped!r}: URLs are not accepted (code is never downloaded); "
                         "give a module name, a .py file or Python source text")
    if "\n" not in stripped and stripped.endswith(".py"):
        path = os.path.abspath(os.path.expanduser(stripped))
        source = _read_safe_source(path)
        modname = os.path.basename(path)[:-3]
        module = types.ModuleType(modname)
        module.__file__ = path
        exec(compile(source, path, "exec"), module.__dict__)
        sys.modules[modname] = module  # as dask: tasks on this server may import it
        return module
    if _is_module_name(stripped):
        return importlib.import_module(stripped)
    digest = hashlib.sha256(name.encode()).hexdigest()[:12]
    module = types.ModuleType(f"preload_{digest}")
    exec(compile(name, f"<preload {digest}>", "exec"), module.__dict__)
    return module


def _is_click_command(fn: Any) -> bool:
    return callable(getattr(fn, "make_context", None)) and hasattr(fn, "callback") and hasattr(fn, "params")


class Preload:
    """One preload of one server: its module, and the ``dask_setup``/``dask_teardown`` calls.

    Args:
        server: the Scheduler, Worker or Nanny.
        name: the module name, file or source text.
        argv: its command-line arguments (for a click-command ``dask_setup``).
    """

    def __init__(self, server: Any, name: str, argv: Sequence[str] = ()):
        self.server = server
        self.name = name
        self.argv = list(argv)
        self.module = load_preload(name)
        setup = getattr(self.module, "dask_setup", None)
        if self.argv and setup is not None and not _is_click_command(setup):
            raise ValueError(f"preload {_short(name)}: preload_argv {self.argv!r} given, but its "
                             "dask_setup is a plain function, which takes no arguments")

    async def start(self) -> None:
        """Call ``dask_setup(server)`` (with the parsed ``argv`` for a click command)."""
        setup = getattr(self.module, "dask_setup", None)
        if setup is None:
            return
        if _is_click_command(setup):
            # click's own parsing, through the command object: no import of click here.
            ctx = setup.make_context("dask_setup", list(self.argv))
            result = setup.callback(self.server, *ctx.args, **ctx.params)
        else:
            result = setup(self.server)
        if asyncio.iscoroutine(result):
            await result
        logger.info("preload %s: dask_setup ran", _short(self.name))

    async def teardown(self) -> None:
        """Call ``dask_teardown(server)`` if the module has one."""
        teardown = getattr(self.module, "dask_teardown", None)
        if teardown is None:
            return
        result = teardown(self.server)
        if asyncio.iscoroutine(result):
            await result


def _short(name: str) -> str:
    return repr(name if len(name) <= 60 and "\n" not in name else name.strip().splitlines()[0][:57] + "...")


def process_preloads(server: Any, preload: str | Sequence[str] | None,
                     preload_argv: Sequence[str] | Sequence[Sequence[str]] | None,
                     owner: str = "server") -> list[Preload]:
    """The server's preloads, loaded now (``preload`` is one or a list).

    ``preload_argv`` is one list of arguments for every preload, or one list
    per preload.

    Raises:
        TypeError: ``preload`` or ``preload_argv`` of the wrong shape.
        ValueError / UnsafePathError / ImportError: a preload that cannot be used.
    """
    if not preload:
        if preload_argv:
            raise ValueError(f"{owner}(preload_argv={preload_argv!r}) without a preload")
        return []
    names = [preload] if isinstance(preload, str) else list(preload)
    if not all(isinstance(n, str) for n in names):
        raise TypeError(f"{owner}(preload={preload!r}): expected a module name, a .py file, Python "
                        "source text, or a list of those")
    argv = list(preload_argv or ())
    if argv and all(isinstance(a, (list, tuple)) for a in argv):
        if len(argv) != len(names):
            raise ValueError(f"{owner}(preload_argv=...): {len(argv)} argument lists for "
                             f"{len(names)} preloads")
        per = [list(a) for a in argv]
    elif all(isinstance(a, str) for a in argv):
        per = [argv] * len(names)
    else:
        raise TypeError(f"{owner}(preload_argv={preload_argv!r}): expected a list of str, or one "
                        "list of str per preload")
    return [Preload(server, n, a) for n, a in zip(names, per, strict=True)]


async def start_preloads(preloads: list[Preload]) -> None:
    """``dask_setup`` of each preload, in order (a failure fails the server's start)."""
    for p in preloads:
        await p.start()


async def teardown_preloads(preloads: list[Preload]) -> None:
    """``dask_teardown`` of each preload, in reverse order; failures are logged, not raised."""
    for p in reversed(preloads):
        try:
            await p.teardown()
        except Exception:
            logger.exception("preload %s failed in dask_teardown", _short(p.name))


__all__ = ["Preload", "load_preload", "process_preloads", "start_preloads", "teardown_preloads"]
