"""Data entering and leaving the cluster through the scheduler: gather, scatter,
update_data, and where keys live.

A part of :class:`cluster.runtime.scheduler.Scheduler` (``scheduler.data`` / ``scheduler.ops``).  Clients normally gather
straight from workers; these are the routes through the scheduler
(``direct=False``) and the bookkeeping that scatter needs.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict
from collections.abc import Hashable, Iterable
from typing import Any

from ..comm.serialize import box_large
from ..errors import CommError
from ..utils import parse_timedelta
from .events import UpdateDataEvent
from .records import FreeKeysMsg

logger = logging.getLogger(__name__)

Key = Hashable


class SchedulerData:
    """Gather, scatter and who-has queries of the Scheduler."""

    def __init__(self, scheduler: Any):
        self.scheduler = scheduler

    # ------------------------------------------------------------------ data

    def get_who_has(self, keys: Iterable[Key] | None = None) -> dict:
        tasks = self.scheduler.state.tasks
        if keys is None:
            keys = list(tasks)
        return {k: [ws.address for ws in tasks[k].who_has] if k in tasks else [] for k in keys}

    def get_has_what(self, workers: Iterable[str] | None = None) -> dict:
        wss = self.scheduler.state.workers
        if workers is None:
            workers = list(wss)
        return {w: [ts.key for ts in wss[w].has_what] if w in wss else [] for w in workers}

    def get_nthreads(self, workers: Iterable[str] | None = None) -> dict:
        wss = self.scheduler.state.workers
        if workers is None:
            return {a: ws.nthreads for a, ws in wss.items()}
        return {w: wss[w].nthreads for w in workers if w in wss}

    async def gather(self, keys: Iterable[Key] = (), serializers=None) -> dict:
        """Collect data for ``keys`` from the workers that hold them (through us)."""
        keys = list(keys)
        who_has = self.get_who_has(keys)
        by_worker: dict[str, list] = defaultdict(list)
        missing = []
        for k in keys:
            if who_has[k]:
                by_worker[who_has[k][0]].append(k)
            else:
                missing.append(k)
        data: dict = {}

        async def fetch(addr: str, ks: list) -> None:
            try:
                reply = await self.scheduler.rpc.call(addr, "get_data", keys=ks)
                data.update(reply["data"])
                missing.extend(k for k in ks if k not in reply["data"])
            except (CommError, OSError):
                missing.extend(ks)

        await asyncio.gather(*(fetch(a, ks) for a, ks in by_worker.items()))
        if missing:
            return {"status": "error", "keys": missing}
        return {"status": "OK", "data": {k: box_large(v) for k, v in data.items()}}

    async def scatter(self, data: dict | None = None, workers: Iterable[str] | None = None,
                      client: str | None = None, broadcast: bool = False, timeout: float = 2) -> list:
        """Send data out to workers and register it for ``client``.

        Raises:
            ClusterTimeoutError: no worker arrived within ``timeout`` seconds.
        """
        from ..errors import ClusterTimeoutError

        data = data or {}
        deadline = time.monotonic() + (parse_timedelta(timeout) or 0)
        while True:
            candidates = [a for a, ws in self.scheduler.state.workers.items() if ws.status == "running"]
            if workers is not None:
                wanted = set(workers)
                candidates = [a for a in candidates if a in wanted or self.scheduler.state.workers[a].name in wanted
                              or self.scheduler.state.workers[a].host in wanted]
            if candidates:
                break
            if time.monotonic() > deadline:
                raise ClusterTimeoutError(f"no workers to scatter to within {timeout}s")
            await asyncio.sleep(0.05)
        self._check_client(client)
        who_has, nbytes, types = await scatter_to_workers(self.scheduler.rpc, candidates, data, broadcast)
        if self._client_gone(client, who_has):
            return []
        self.scheduler._send(self.scheduler.state.handle(UpdateDataEvent(who_has, nbytes, client, types, self.scheduler._stimulus("scatter"))))
        return list(data)

    def update_data(self, who_has: dict | None = None, nbytes: dict | None = None,
                    client: str | None = None, types: dict | None = None, serializers=None) -> str:
        """Learn that new data has entered the cluster from outside (a direct scatter)."""
        if self._client_gone(client, who_has or {}):
            return "OK"
        self.scheduler._send(self.scheduler.state.handle(UpdateDataEvent(who_has or {}, nbytes, client, types, self.scheduler._stimulus("update-data"))))
        return "OK"

    def _check_client(self, client: str | None) -> None:
        """Raise ValueError if ``client`` is given but not connected."""
        if client is not None and client not in self.scheduler.client_comms:
            raise ValueError(f"client {client!r} is not connected to this scheduler")

    def _client_gone(self, client: str | None, who_has: dict) -> bool:
        """Whether data put on workers for ``client`` is unwanted: the client left (or
        never came) while it was scattering.  Then each worker is told to drop its
        copies (of keys it holds for nobody else) -- registering them for a client
        that is gone would keep them for good."""
        if client is None or client in self.scheduler.client_comms:
            return False
        logger.info("dropping data scattered for client %s, which is gone", client)
        drop: dict[str, list] = defaultdict(list)
        for key, workers in who_has.items():
            ts = self.scheduler.state.tasks.get(key)
            held = {ws.address for ws in ts.who_has} if ts is not None else set()
            for w in workers:
                if w not in held:
                    drop[w].append(key)
        stimulus_id = self.scheduler._stimulus("client-gone")
        self.scheduler._send([FreeKeysMsg(stimulus_id, w, keys) for w, keys in drop.items()])
        return True


async def scatter_to_workers(rpc, workers: list[str], data: dict, broadcast: bool = False):
    """Put ``data`` on ``workers`` (round robin, or all of them) with ``update_data``.

    Returns ``(who_has, nbytes, types)``.
    """
    assignment: dict[str, dict] = defaultdict(dict)
    keys = list(data)
    for i, k in enumerate(keys):
        if broadcast:
            for w in workers:
                assignment[w][k] = data[k]
        else:
            assignment[workers[i % len(workers)]][k] = data[k]
    who_has: dict = defaultdict(list)
    nbytes: dict = {}
    types: dict = {}

    async def send(addr: str, chunk: dict) -> None:
        reply = await rpc.call(addr, "update_data", data={k: box_large(v) for k, v in chunk.items()}, report=False)
        for k in chunk:
            who_has[k].append(addr)
        nbytes.update(reply["nbytes"])
        types.update(reply.get("types", {}))

    await asyncio.gather(*(send(a, c) for a, c in assignment.items()))
    return dict(who_has), nbytes, types
