"""Self-contained HTML pages written as the user's private files.

The performance report and a saved task stream are one HTML file each: the
status page's style inline, no network fetch (a Content-Security-Policy of
``default-src 'none'``), written 0600 over nothing that is another user's.
"""

from __future__ import annotations

import html
import json
import os
from typing import Any

from ..errors import UnsafePathError
from ..files import write_private_file

_STYLE = os.path.join(os.path.dirname(__file__), "static", "style.css")
_REPORT_CSS = """
section { overflow-x: auto; }
svg.task-stream { display: block; background: #fff; }
pre.code { background: #f3f5f9; padding: .8em; overflow: auto; font: 12px/1.45 ui-monospace, monospace; margin: 0; }
table.kv th { color: var(--muted); font-weight: normal; width: 16em; }
.note { color: var(--muted); margin: .4em 0 0; }
"""
_CSP = ("default-src 'none'; style-src 'unsafe-inline'; script-src 'unsafe-inline'; "
        "img-src data:")
# Marks what rendered, for whoever checks the page in a browser (and shows the
# numbers in the header): the tasks drawn with a non-zero size.
_SCRIPT = """
"use strict";
const drawn = [...document.querySelectorAll("svg.task-stream rect.task")]
  .filter(r => r.getBoundingClientRect().width > 0).length;
document.body.dataset.renderedTasks = drawn;
const data = JSON.parse(document.getElementById("report-data").textContent);
document.body.dataset.tasks = data.tasks;
"""


# ----------------------------------------------------------------------------- files


def write_html(filename: Any, text: str, option: str) -> str:
    """Write ``text`` to the local file ``filename`` (0600), replacing a file of ours.

    Args:
        filename: a local path (``str`` or path-like).
        text: the page.
        option: the argument's name, for errors.

    Returns:
        The absolute path written.

    Raises:
        ValueError: a URL (we write local files only).
        UnsafePathError: something of another user's is at that path.
        FileNotFoundError: its directory does not exist.
    """
    if not isinstance(filename, (str, os.PathLike)):
        raise TypeError(f"{option}={filename!r}: expected a local file path (str or os.PathLike)")
    path = os.path.abspath(os.fsdecode(os.fspath(filename)))
    if "://" in os.fsdecode(os.fspath(filename)):
        raise ValueError(f"{option}={filename!r}: only local files are written (no fsspec URLs); "
                         "give a path")
    directory = os.path.dirname(path)
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"{option}={filename!r}: the directory {directory} does not exist")
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        st = None
    if st is not None:
        import stat

        if stat.S_ISDIR(st.st_mode):
            raise IsADirectoryError(f"{option}={filename!r}: {path} is a directory")
        if st.st_uid != os.geteuid():
            raise UnsafePathError(f"{option} {path}: it belongs to user id {st.st_uid}, not to us "
                                  f"(user id {os.geteuid()}); refusing to replace it")
    return write_private_file(path, text)


def standalone_page(title: str, body: str, data: dict | None = None) -> str:
    """A complete HTML page: the status page's style inline, ``body``, optional JSON data."""
    with open(_STYLE, encoding="utf-8") as f:
        css = f.read()
    blob = ""
    if data is not None:
        # "<" escaped so that no text inside can close the script element.
        text = json.dumps(data, default=str, separators=(",", ":")).replace("<", "\\u003c")
        blob = f'<script type="application/json" id="report-data">{text}</script>' \
               f"<script>{_SCRIPT}</script>"
    return ("<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<meta http-equiv=\"Content-Security-Policy\" content=\"{_CSP}\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>{html.escape(title)}</title><style>{css}{_REPORT_CSS}</style></head>"
            f"<body>{body}{blob}</body></html>\n")
