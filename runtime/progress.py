"""``progress(futures)``: a progress bar in a terminal, or a widget in Jupyter.

In a terminal (or any stream) the bar is written to ``sys.stderr`` and
rewritten in place (``\\r``) while the futures run; on a stream that is not a
terminal (a log file, a captured stream) only the final line is written, so
logs do not fill with redraws.  ``progress`` returns once every future is
done, as dask's text bar does; with an asynchronous client it returns an
awaitable instead.

In a Jupyter notebook with ``ipywidgets`` installed it shows a widget that
updates from a background thread and returns at once (non-blocking).
``ipywidgets`` is not a dependency: without it a notebook gets the text bar.

The state of each future is read on the client (``Future.done()``), so
watching costs the cluster nothing.
"""

from __future__ import annotations

import asyncio
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterable
from typing import Any, TextIO

from .futures import Future, futures_of, is_dask_collection
from .utils import key_split

#: Seconds between redraws.
INTERVAL = 0.1


def _flatten(items: Iterable[Any]) -> list[Future]:
    out: list[Future] = []
    for x in items:
        if isinstance(x, Future):
            out.append(x)
        elif isinstance(x, dict):
            out.extend(_flatten(x.values()))
        elif isinstance(x, (list, tuple, set, frozenset)):
            out.extend(_flatten(x))
        elif is_dask_collection(x):  # a persisted collection
            out.extend(futures_of(x))
        else:
            raise TypeError(f"progress() takes futures (or collections of them), not "
                            f"{type(x).__name__}")
    return out


def in_notebook() -> bool:
    """Whether we run in a Jupyter kernel."""
    shell = sys.modules.get("IPython")
    if shell is None:
        return False
    try:
        ip = shell.get_ipython()
    except Exception:
        return False
    return ip is not None and type(ip).__name__ == "ZMQInteractiveShell"


def format_time(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:4.1f}s"
    minutes, s = divmod(int(seconds), 60)
    hours, m = divmod(minutes, 60)
    return f"{hours}hr {m:2d}min" if hours else f"{m}min {s:2d}s"


class TextProgressBar:
    """A one-line text bar over ``futures``.

    Args:
        futures: the futures to watch.
        width: characters of the bar itself.
        file: where to write (default ``sys.stderr``).
        multi: also show counts per task prefix.
        interval: seconds between redraws.
    """

    def __init__(self, futures: list[Future], width: int = 40, file: TextIO | None = None,
                 multi: bool = False, interval: float = INTERVAL):
        self.futures = futures
        self.width = width
        self.file = file if file is not None else sys.stderr
        self.multi = multi
        self.interval = interval
        self.start = time.monotonic()
        try:
            self.tty = self.file.isatty()
        except (AttributeError, ValueError):
            self.tty = False
        self.prefixes = [key_split(f.key) for f in futures] if multi else []

    def counts(self) -> tuple[int, int]:
        """``(done, total)``."""
        return sum(1 for f in self.futures if f.done()), len(self.futures)

    def line(self) -> str:
        done, total = self.counts()
        frac = done / total if total else 1.0
        filled = int(self.width * frac)
        text = (f"[{'#' * filled}{' ' * (self.width - filled)}] | {frac * 100:3.0f}% Completed | "
                f"{format_time(time.monotonic() - self.start)}")
        if self.multi:
            all_ = Counter(self.prefixes)
            fin = Counter(p for p, f in zip(self.prefixes, self.futures, strict=True) if f.done())
            text += " | " + " · ".join(f"{p} {fin[p]}/{n}" for p, n in sorted(all_.items()))
        return text

    def draw(self, final: bool = False) -> None:
        if not (self.tty or final):
            return
        self.file.write("\r" + self.line() + ("\n" if final else ""))
        self.file.flush()

    def finished(self) -> bool:
        return all(f.done() for f in self.futures)

    def wait(self) -> None:
        """Redraw until every future is done (blocking)."""
        while not self.finished():
            self.draw()
            time.sleep(self.interval)
        self.draw(final=True)

    async def wait_async(self) -> None:
        """Redraw until every future is done (on the running event loop)."""
        while not self.finished():
            self.draw()
            await asyncio.sleep(self.interval)
        self.draw(final=True)


class WidgetProgressBar:  # pragma: no cover - needs a Jupyter kernel and ipywidgets
    """An ``ipywidgets`` bar updated from a background thread."""

    def __init__(self, futures: list[Future], interval: float = INTERVAL):
        import ipywidgets

        self.bar = TextProgressBar(futures, interval=interval)
        self.widget = ipywidgets.IntProgress(min=0, max=max(1, len(futures)), value=0,
                                             description="Progress")
        self.label = ipywidgets.HTML("")
        self.box = ipywidgets.HBox([self.widget, self.label])

    def _update(self) -> None:
        while True:
            done, total = self.bar.counts()
            self.widget.value = done
            self.label.value = (f"{done} / {total} "
                                f"{format_time(time.monotonic() - self.bar.start)}")
            if done >= total:
                self.widget.bar_style = "success"
                return
            time.sleep(self.bar.interval)

    def start(self):
        from IPython.display import display

        display(self.box)
        threading.Thread(target=self._update, name="progress", daemon=True).start()
        return self.box


def progress(*futures: Any, notebook: bool | None = None, multi: bool = False,
             complete: bool = True, file: TextIO | None = None, interval: float = INTERVAL,
             width: int = 40):
    """Show the progress of ``futures`` (futures, or lists/dicts of them).

    Args:
        notebook: a Jupyter widget (non-blocking) instead of a text bar; by
            default, a widget when running in Jupyter with ``ipywidgets``.
        multi: also show counts per task prefix (``inc 30/50 · sum 0/1``).
        complete: accepted for compatibility (finished futures always count).
        file: where the text bar goes (default ``sys.stderr``).
        interval: seconds between redraws.
        width: characters of the bar.

    Returns:
        ``None`` once all are done (text bar); the widget (notebook); an
        awaitable when the futures belong to an asynchronous client.

    Raises:
        TypeError: something other than futures was given.
    """
    futs = _flatten(futures)
    if notebook is None:
        notebook = in_notebook()
    if notebook:
        try:
            import ipywidgets  # noqa: F401
        except ImportError:
            notebook = False
        else:  # pragma: no cover - needs a kernel
            return WidgetProgressBar(futs, interval).start()
    bar = TextProgressBar(futs, width=width, file=file, multi=multi, interval=interval)
    if any(getattr(f.client, "asynchronous", False) for f in futs):
        return bar.wait_async()
    bar.wait()
    return None
