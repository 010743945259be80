"""The scheduler: a pure state machine (:mod:`.state`) inside an IO shell (:mod:`.server`).

Parts of the package, one concept each:

* :mod:`.records` -- task, worker and client records and the instructions the
  state emits;
* :mod:`.events` -- the typed events the state takes;
* :mod:`.state` -- :class:`SchedulerState`: the transition table, ``handle``;
* :mod:`.stimuli` -- what each event does to the state;
* :mod:`.placement` -- :class:`Placement`: which worker runs a task, and when;
* :mod:`.elastic` -- plans (pure functions): which workers to close, how many
  to want, the data moves of retiring, replicating, rebalancing;
* :mod:`.validation` -- the invariants ``validate=True`` checks;
* :mod:`.server` -- :class:`Scheduler`, the IO shell, and its parts
  :mod:`.data` (gather, scatter) and :mod:`.ops` (cluster operations, plugins).
"""

from ..utils import lazy_attributes

#: Where each public name lives, imported on first use (PEP 562): importing one
#: part of the package (its events, its records) does not load the server.
_LAZY = {'Scheduler': '.server', 'SchedulerState': '.state', 'get_ip_for': '..utils'}


__getattr__ = lazy_attributes(__name__, _LAZY, globals())


__all__ = ['Scheduler', 'SchedulerState', 'get_ip_for']
