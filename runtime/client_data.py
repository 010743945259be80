"""Moving data between the client and the workers: gathering results, scattering inputs.

Plain functions over a :class:`~cluster.runtime.client.Client`: results are fetched
straight from a worker that holds them (the scheduler says which), or through
the scheduler with ``direct=False``; ``scatter`` puts local data on workers,
straight or through the scheduler.
"""

from __future__ import annotations

import asyncio
import hashlib
import pickle
import uuid
from collections import defaultdict
from typing import TYPE_CHECKING

from .comm.serialize import box_large
from .core import unpack_reply
from .errors import ClusterError, CommError
from .futures import Future
from .utils import key_split, parse_timedelta, validate_key

if TYPE_CHECKING:  # pragma: no cover
    from .client import Client


async def gather_keys(client: Client, keys: list) -> dict:
    """Fetch ``keys`` from the workers that hold them; keys that vanished are left out."""
    by_worker: dict[str, list] = defaultdict(list)
    unknown = []
    for k in dict.fromkeys(keys):
        st = client.futures.get(k)
        workers = st.workers if st is not None else ()
        if workers:
            by_worker[workers[0] if len(workers) == 1 else workers[hash(k) % len(workers)]].append(k)
        else:
            unknown.append(k)
    data: dict = {}
    missing: list = list(unknown)
    for addr in list(by_worker):
        ks = by_worker[addr]
        rest = []
        for k in ks:
            st = client.futures.get(k)
            if st is not None and st.value_bytes is not None:
                data[k] = pickle.loads(st.value_bytes)
            else:
                rest.append(k)
        if rest:
            by_worker[addr] = rest
        else:
            del by_worker[addr]

    async def fetch(addr: str, ks: list) -> None:
        try:
            # A holder that is gone (retired, died) is not worth waiting
            # for: ask the scheduler where the data is now instead.
            async with client.rpc.connection(addr, timeout=min(0.5, client.timeout)) as comm:
                await comm.write({"op": "get_data", "keys": ks})
                reply = unpack_reply(await comm.read(), addr)
        except (CommError, OSError):
            missing.extend(ks)
            return
        data.update(reply["data"])
        missing.extend(k for k in ks if k not in reply["data"])

    if len(by_worker) == 1:
        (addr, ks), = by_worker.items()
        await fetch(addr, ks)
    else:
        await asyncio.gather(*(fetch(a, ks) for a, ks in by_worker.items()))
    if missing:
        # Ask the scheduler where they are now (a replica may have moved).
        who_has = await client.rpc.call(client._link, "who_has", keys=missing)
        retry: dict[str, list] = defaultdict(list)
        for k in missing:
            if who_has.get(k):
                retry[who_has[k][0]].append(k)
                st = client.futures.get(k)
                if st is not None:
                    st.workers = tuple(who_has[k])
        missing = []
        await asyncio.gather(*(fetch(a, ks) for a, ks in retry.items()))
    return data


async def gather_via_scheduler(client: Client, keys: list) -> dict:
    reply = await client.rpc.call(client._link, "gather", keys=keys)
    if reply["status"] == "OK":
        return reply["data"]
    got = {k: v for k, v in reply.get("data", {}).items()}
    return got


async def scatter(client: Client, data, workers=None, broadcast=False, direct=None, hash=True, timeout=10):
    client._check_running()
    if isinstance(workers, str):
        workers = [workers]
    single = False
    if isinstance(data, dict):
        keyed = dict(data)
        for k in keyed:
            validate_key(k)
    else:
        if isinstance(data, (list, tuple, set, frozenset)):
            values = list(data)
        else:
            values = [data]
            single = True
        keyed = {}
        for v in values:
            if hash:
                try:
                    token = hashlib.md5(pickle.dumps(v, protocol=5), usedforsecurity=False).hexdigest()
                except Exception:
                    token = uuid.uuid4().hex
            else:
                token = uuid.uuid4().hex
            keyed[f"{key_split(type(v).__name__)}-{token}"] = v
    # Register the futures before the data lands so the report finds them.
    futures = {k: Future(k, client) for k in keyed}
    if direct:
        from .scheduler.data import scatter_to_workers

        info = await client.rpc.call(client._link, "identity")
        candidates = list(info["workers"])
        if workers is not None:
            wanted = set(workers)
            candidates = [a for a, w in info["workers"].items()
                          if a in wanted or w["name"] in wanted or w["host"] in wanted]
        if not candidates:
            raise ClusterError("no workers to scatter to")
        who_has, nbytes, types = await scatter_to_workers(client.rpc, candidates, keyed, broadcast)
        await client.rpc.call(client._link, "update_data", who_has=who_has, nbytes=nbytes,
                            client=client.id, types=types)
    else:
        await client.rpc.call(client._link, "scatter", data={k: box_large(v) for k, v in keyed.items()},
                            workers=workers, client=client.id,
                            broadcast=broadcast, timeout=timeout)
    for f in futures.values():
        await f._state.wait(parse_timedelta(timeout))
    if isinstance(data, dict):
        return futures
    out = [futures[k] for k in keyed]
    if single:
        return out[0]
    return type(data)(out) if isinstance(data, (tuple, set, frozenset)) else out
