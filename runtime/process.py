"""Worker processes: start one, watch it, stop it without leaving it behind.

A worker process is ``python -m runtime.worker_process '<json options>'``
started with a pipe on its standard input.  The child treats end-of-file on
that pipe as "my parent is gone": it closes itself.  So a crashed or killed
parent never leaves orphans, and a normal stop is just closing the pipe, then
SIGTERM, then SIGKILL, each after a grace period.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import sys
from contextlib import suppress
from typing import Any

logger = logging.getLogger(__name__)


def child_environment(extra: dict[str, str] | None = None) -> dict[str, str]:
    """Our environment, with ``sys.path`` passed on so the child imports what we import."""
    env = dict(os.environ)
    paths = [p for p in sys.path if p and os.path.isdir(p)]
    old = env.get("PYTHONPATH")
    env["PYTHONPATH"] = os.pathsep.join(paths + ([old] if old else []))
    if extra:
        env.update({k: str(v) for k, v in extra.items()})
    return env


class WorkerProcess:
    """One worker in a child process.

    Args:
        scheduler_address: where the worker should register.
        worker_kwargs: JSON-able keyword arguments for ``Worker``.
        env: extra environment variables for the child.
    """

    def __init__(self, scheduler_address: str, worker_kwargs: dict[str, Any] | None = None,
                 env: dict[str, str] | None = None):
        self.scheduler_address = scheduler_address
        self.worker_kwargs = dict(worker_kwargs or {})
        self.env = env
        self.process: asyncio.subprocess.Process | None = None

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    @property
    def name(self):
        return self.worker_kwargs.get("name")

    async def start(self) -> WorkerProcess:
        options = json.dumps({"scheduler_ip": self.scheduler_address, **self.worker_kwargs})
        self.process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "runtime.worker_process", options,
            stdin=asyncio.subprocess.PIPE, env=child_environment(self.env),
        )
        return self

    def __await__(self):
        return self.start().__await__()

    def is_alive(self) -> bool:
        return self.process is not None and self.process.returncode is None

    async def close(self, timeout: float = 5.0) -> int | None:
        """Stop the child: close its stdin, then SIGTERM, then SIGKILL."""
        proc = self.process
        if proc is None or proc.returncode is not None:
            return proc.returncode if proc else None
        if proc.stdin is not None:
            with suppress(Exception):
                proc.stdin.close()
        for sig, grace in ((None, timeout), (signal.SIGTERM, 2.0), (signal.SIGKILL, 5.0)):
            if sig is not None:
                with suppress(ProcessLookupError):
                    proc.send_signal(sig)
            try:
                return await asyncio.wait_for(proc.wait(), grace)
            except asyncio.TimeoutError:
                continue
        logger.error("worker process %s did not exit", proc.pid)  # pragma: no cover
        return None

    def kill(self) -> None:
        """SIGKILL the child at once (for tests of failure)."""
        if self.process is not None and self.process.returncode is None:
            with suppress(ProcessLookupError):
                self.process.kill()
