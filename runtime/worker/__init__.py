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
  (``python -P -m runtime.worker.process``).
"""

from .memory import parse_memory_limit
from .server import Worker

__all__ = ["Worker", "parse_memory_limit"]
