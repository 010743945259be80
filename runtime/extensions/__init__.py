"""Coordination between tasks and clients, each a scheduler extension and its client-side handle.

Each module owns one concept: the scheduler part (see
:mod:`runtime.scheduler.extensions` for the seam) and the class users hold
(``Variable``, ``Queue``, ``Lock``, ``Semaphore``, ``Event``, datasets).
"""
