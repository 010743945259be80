"""``python -m cluster config``: the effective configuration and where each value came from.

Prints one line per key, ``key: value  # source``, where the source is a
file path, an environment variable (``$HPC_CLUSTER__...``, ``$DASK_...``) or
``default`` (``runtime/config.yaml``); values are written as JSON (``null``,
``true``, strings quoted).  ``PREFIX`` limits the output to keys that start
with it (``python -m cluster config jobqueue.slurm``); ``--changed`` leaves
out the built-in defaults.  The files searched come first, as comments.

Exit status: 0; 1 when the configuration has an error (a value of the wrong
type: the message names the file, the key and the accepted values); 2 for a
bad command line.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import warnings
from collections.abc import Sequence

from cluster.runtime import config as cfg

PRECEDENCE = ("constructor arguments > command-line flags > CLUSTER_<OPTION> variables > "
              "config.set() > HPC_CLUSTER__* variables > our files > DASK_* variables > "
              "dask's files > built-in defaults")


def parser(prog: str) -> argparse.ArgumentParser:
    """The ``config`` command's options."""
    p = argparse.ArgumentParser(
        prog=prog, allow_abbrev=False, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Print the effective configuration and where each value came from.",
        epilog=f"precedence (highest first):\n  {PRECEDENCE}\n\nsee docs/configuration.md")
    p.add_argument("prefix", nargs="?", default="", metavar="PREFIX",
                   help="only keys starting with this, e.g. worker.memory or jobqueue.slurm")
    p.add_argument("--changed", action="store_true",
                   help="leave out the values that are built-in defaults")
    return p


def _value(value: object) -> str:
    try:
        return json.dumps(value)
    except TypeError:
        return repr(value)


def render(prefix: str = "", changed: bool = False) -> str:
    """The text ``config`` prints.

    Raises:
        ConfigError: a configured value of the wrong type.
    """
    lines = [f"# precedence (highest first): {PRECEDENCE}"]
    for label, paths in (("our files", cfg.our_paths()), ("dask's files", cfg.dask_paths())):
        read = cfg.config_files(paths)
        lines.append(f"# {label}: searched {', '.join(paths)}; read "
                     f"{', '.join(read) if read else 'none'}")
    items = [(k, s) for k, s in sorted(cfg.settings(prefix.strip()).items())
             if not (changed and s.default)]
    width = max((len(k) + len(_value(s.value)) for k, s in items), default=0) + 2
    for key, s in items:
        text = f"{key}: {_value(s.value)}"
        lines.append(f"{text.ljust(width)}  # {s.source}")
    if not items:
        lines.append(f"# no key starts with {prefix!r}")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str], prog: str = "python -m cluster config") -> int:
    """Run the command; return the exit status (argparse's exits become return values)."""
    try:
        args = parser(prog).parse_args(list(argv))
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 2
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    with warnings.catch_warnings():
        # Unknown keys are reported once each, on stderr, with their file.
        warnings.simplefilter("always", cfg.ConfigWarning)
        warnings.showwarning = _show
        try:
            cfg.refresh()
            text = render(args.prefix, args.changed)
        except cfg.ConfigError as e:
            sys.stderr.write(f"{prog}: error: {e}\n")
            return 1
    sys.stdout.write(text)
    return 0


def _show(message, category, filename, lineno, file=None, line=None) -> None:
    sys.stderr.write(f"warning: {message}\n")


__all__ = ["main", "render"]

if __name__ == "__main__":  # pragma: no cover
    sys.exit(main(sys.argv[1:], prog=os.path.basename(sys.argv[0])))
