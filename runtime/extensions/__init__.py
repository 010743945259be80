"""Coordination between tasks and clients, each a scheduler extension and its client-side handle.

Each module owns one concept: the scheduler part (see
:mod:`cluster.runtime.scheduler.extensions` for the seam) and the class users hold
(``Variable``, ``Queue``, ``Lock``, ``Semaphore``, ``Event``, datasets).
"""

from collections.abc import Callable
from typing import Any

from .datasets import PublishExtension
from .event import EventExtension
from .fire_and_forget import FireAndForgetExtension
from .queue import QueueExtension
from .semaphore import SemaphoreExtension
from .variable import VariableExtension

#: The extensions every Scheduler has unless ``extensions=`` says otherwise:
#: ``{name: factory(scheduler)}``.
DEFAULT_EXTENSIONS: dict[str, Callable[[Any], Any]] = {
    "events": EventExtension,
    "fire_and_forget": FireAndForgetExtension,
    "publish": PublishExtension,
    "queues": QueueExtension,
    "semaphores": SemaphoreExtension,  # also Lock's
    "variables": VariableExtension,
}
