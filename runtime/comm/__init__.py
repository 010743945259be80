"""Transports: ``connect``/``listen`` by address, one ``Comm`` interface."""

from . import inproc, tcp  # noqa: F401  (register the backends)
from .core import Comm, Listener, connect, listen
from .serialize import box_large, dumps, dumps_function, loads

__all__ = ["Comm", "Listener", "box_large", "connect", "dumps", "dumps_function", "listen", "loads"]
