"""The batch systems, one module each: :mod:`.slurm`, :mod:`.pbs`, :mod:`.sge` (base: :mod:`.base`).

:data:`SYSTEMS` maps each ``system=`` name to its class; :func:`get_system`
turns a name, a class or an instance into an instance.
"""

from __future__ import annotations

from typing import Any

from .base import BatchSystem
from .pbs import PBS
from .sge import SGE
from .slurm import SLURM

#: ``system=`` name -> batch system class.
SYSTEMS: dict[str, type[BatchSystem]] = {s.name: s for s in (SLURM, PBS, SGE)}


def system_class(system: str | type[BatchSystem] | BatchSystem) -> type[BatchSystem]:
    """The class of ``system`` (a name such as ``"slurm"``, a class or an instance).

    Raises:
        ValueError: an unknown name.
        TypeError: anything else.
    """
    if isinstance(system, BatchSystem):
        return type(system)
    if isinstance(system, type) and issubclass(system, BatchSystem):
        return system
    if isinstance(system, str):
        cls = SYSTEMS.get(system.lower())
        if cls is None:
            raise ValueError(f"system={system!r}: expected one of {', '.join(SYSTEMS)}")
        return cls
    raise TypeError(f"system={system!r}: expected a name ({', '.join(SYSTEMS)}) or a BatchSystem")


def get_system(system: str | type[BatchSystem] | BatchSystem, **options: Any) -> BatchSystem:
    """An instance of ``system`` with ``options`` (an instance is returned as it is).

    Raises:
        ValueError, TypeError: an unknown system or a bad option (named).
    """
    if isinstance(system, BatchSystem):
        if options:
            raise TypeError(f"options {', '.join(sorted(options))} given with a {system.title} "
                            "instance: give them to the instance")
        return system
    return system_class(system)(**options)


__all__ = ["PBS", "SGE", "SLURM", "SYSTEMS", "BatchSystem", "get_system", "system_class"]
