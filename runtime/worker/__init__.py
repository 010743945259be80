"""The worker: a pure state machine (:mod:`.state`) inside an IO shell (:mod:`.server`).

Parts of the package, one concept each:

* :mod:`.events` -- the events the state takes and the instructions it emits;
* :mod:`.state` -- :class:`WorkerStateMachine`: a worker's tasks and their
  transition table, ``handle``;
* :mod:`.validation` -- the invariants ``validate=True`` checks;
* :mod:`.memory` -- parsing the memory limit and fractions;
* :mod:`.server` -- :class:`Worker`, the IO shell (thread pool, transfers,
  memory monitor);
* :mod:`.process` -- the entry point of a worker process
  (``python -P -m cluster.runtime.worker.process``).
"""

from ..utils import lazy_attributes

#: Exit code of a worker process whose worker asked to be replaced by a fresh
#: one (``Worker.restart_requested``, e.g. ``lifetime_restart``): EX_TEMPFAIL.
#: (Here, light to import, for both sides: :mod:`.process` and
#: :mod:`cluster.runtime.process`, which starts worker processes.)
RESTART_EXIT_CODE = 75

#: Command-line flag of a pre-warmed child: it imports the runtime, then waits
#: for its options on its standard input (see :func:`cluster.runtime.process.prewarm`).
WARM_FLAG = "--options-from-stdin"

#: Where each public name lives, imported on first use (PEP 562): importing one
#: part of the package (its events, its records) does not load the server.
_LAZY = {'Worker': '.server', 'parse_memory_limit': '.memory'}


__getattr__ = lazy_attributes(__name__, _LAZY, globals())


__all__ = ['Worker', 'parse_memory_limit']
