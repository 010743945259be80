"""A sampling profiler of running tasks, summarised per task prefix.

A sampler thread (only while profiling is on) takes the stacks of all threads
every ``interval`` seconds (``sys._current_frames``), keeps those running a
task (a frame of :func:`cluster.runtime.execution.run_task` on the stack, whose
``key`` local names the task) and counts, per task prefix, each function on
the task's part of the stack.  Nothing is added to the task path itself.
"""

from __future__ import annotations

import sys
import threading
from collections import Counter
from types import FrameType

from ..utils import key_split

_RUN_TASK_CODE = None


def _run_task_code():
    global _RUN_TASK_CODE
    if _RUN_TASK_CODE is None:
        from ..execution import run_task

        _RUN_TASK_CODE = run_task.__code__
    return _RUN_TASK_CODE


def _describe(frame: FrameType) -> str:
    code = frame.f_code
    return f"{code.co_name} ({code.co_filename}:{code.co_firstlineno})"


class Profile:
    """Samples per prefix: ``{prefix: [samples, Counter(function -> samples on stack)]}``."""

    def __init__(self) -> None:
        self.data: dict[str, list] = {}
        self.lock = threading.Lock()

    def sample(self) -> int:
        """Take one sample of every thread running a task; return how many were running one."""
        target = _run_task_code()
        n = 0
        for frame in sys._current_frames().values():
            chain = []
            f: FrameType | None = frame
            key = None
            while f is not None:
                if f.f_code is target:
                    key = f.f_locals.get("key")
                    break
                chain.append(f)
                f = f.f_back
            if f is None or key is None:
                continue
            n += 1
            prefix = key_split(key)
            seen = {_describe(fr) for fr in chain}
            with self.lock:
                entry = self.data.get(prefix)
                if entry is None:
                    entry = self.data[prefix] = [0, Counter()]
                entry[0] += 1
                entry[1].update(seen)
        return n

    def summary(self, top: int = 10, prefix: str | None = None) -> dict:
        """``{prefix: {"count": samples, "functions": [[function, samples], ...]}}``."""
        with self.lock:
            items = [(p, e[0], e[1].most_common(top)) for p, e in self.data.items()
                     if prefix is None or p == prefix]
        return {p: {"count": c, "functions": [list(x) for x in fns]} for p, c, fns in items}


class Sampler:
    """A daemon thread calling ``profile.sample()`` every ``interval`` seconds until stopped."""

    def __init__(self, profile: Profile, interval: float = 0.01, name: str = "profiler"):
        self.profile = profile
        self.interval = interval
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> None:
        self.thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.profile.sample()
            except Exception:  # pragma: no cover - a frame vanished under us
                pass

    def stop(self, timeout: float = 2.0) -> None:
        self._stop.set()
        if self.thread.is_alive():
            self.thread.join(timeout)


def merge_profiles(summaries: list[dict], top: int = 10) -> dict:
    """Merge several workers' :meth:`Profile.summary` results."""
    counts: Counter = Counter()
    functions: dict[str, Counter] = {}
    for s in summaries:
        for prefix, entry in s.items():
            counts[prefix] += entry["count"]
            functions.setdefault(prefix, Counter()).update(dict(entry["functions"]))
    return {p: {"count": counts[p], "functions": [list(x) for x in functions[p].most_common(top)]}
            for p in counts}
