"""Protocol fuzzing: random and mutated input at the scheduler's and the worker's ports.

A real validating ``Scheduler`` and ``Worker`` run on 127.0.0.1 (plain
``tcp://``) in the test's event loop; hypothesis, on a thread of its own,
throws at them over blocking sockets:

* random bytes, with and without the ``HPC1`` magic in front;
* a valid magic and header with random (often absurd) frame counts and
  lengths, and whatever bytes follow;
* valid framing around random payloads;
* valid pickles of the wrong shape: not a dict, ``op`` of the wrong type, unknown
  operations, known operations with missing, extra and wrongly typed fields
  (keys as dicts, ints as lists, ...), deep nesting;
* the same wrong shapes *inside* a client's and a worker's stream, after a
  valid ``register_client`` / ``register_worker``;
* truncated messages followed by a half-close, a close or a reset;
* many connections at once.

After the run the servers must still be running, serve a normal ``Client``
(submit and gather), have forgotten every fuzzing peer (clients, workers,
tasks), hold no more file descriptors than before (polled with a deadline:
closing is asynchronous) and have grown by no more than a generous amount
of memory.  A malformed message may close its own connection, never the
server; nor may it leave a half-registered peer or half-built graph behind.

What this does *not* test: that unpickling is safe.  Unpickling attacker data
is code execution by design -- a peer that may send us messages may run code
as the user, which is why a cluster on a shared machine is protected by
mutual TLS (``runtime.security``), and why this fuzz never sends a pickle that
imports anything.  It tests the robustness of framing and dispatch.

Size: ``HPC_FUZZ_EXAMPLES`` examples per case family and target (default 200:
about 2500 cases and 4000 connections in all, well under a minute); hypothesis is
derandomized so that CI runs the same cases every time.  For a longer run::

    HPC_FUZZ_EXAMPLES=5000 .venv/bin/pytest tests/integration/test_fuzz.py
"""

from __future__ import annotations

import asyncio
import collections
import inspect
import logging
import os
import pickle
import socket
import struct
import time
from collections.abc import Callable

import psutil
import pytest
from cluster.runtime.comm.core import HEADER, MAGIC, MAX_FRAMES, MAX_MESSAGE_SIZE
from cluster.runtime.scheduler import validation
from cluster.runtime.utils import parse_address, parse_host_port
from cluster.runtime.worker import validation as worker_validation
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.helpers import gen_cluster, until

#: Examples per case family and target (env ``HPC_FUZZ_EXAMPLES`` for a bigger run).
EXAMPLES = int(os.environ.get("HPC_FUZZ_EXAMPLES", "200"))
#: Seconds a server may take to close a connection after our EOF.
CLOSE_DEADLINE = 10.0
MB = 2**20

#: Operations that do what they say to an authorised peer -- shut a server down,
#: run code, write files, install plugins, move every worker's data around.  They
#: are not robustness bugs, so the fuzz never calls them by name (an unknown
#: random name is still tried).
AUTHORISED_ACTIONS = {
    "close", "close_gracefully", "terminate", "kill", "restart", "retire_workers",
    "close_worker", "unregister", "broadcast", "run", "run_function", "proxy",
    "upload_file", "plugin_add", "register_worker_plugin", "add_plugin", "remove_plugin",
    "replicate", "rebalance", "instantiate",
}

#: Operations that wait, by design, for another client's action when called
#: without a timeout (``Queue.get``, ``Lock.acquire``, ``Event.wait``, ...): a
#: request of theirs may rightly go unanswered for ever, so the fuzz does not
#: call them by name either (their arguments are checked by their own tests).
WAITING_ACTIONS = {
    "queue_get", "queue_put", "variable_get", "variable_set", "semaphore_acquire", "event_wait",
    "publish_put", "fire_and_forget",
}


def inc(x):
    return x + 1


# ----------------------------------------------------------------------------- wire helpers


def framed(*frames: bytes, nframes: int | None = None, lengths: list[int] | None = None) -> bytes:
    """A message in wire format; ``nframes``/``lengths`` override the true values."""
    n = len(frames) if nframes is None else nframes
    lengths = [len(f) for f in frames] if lengths is None else lengths
    return HEADER.pack(MAGIC, n) + struct.pack(f"<{len(lengths)}Q", *lengths) + b"".join(frames)


def message_bytes(obj) -> bytes:
    """``obj`` as one wire message (pickle protocol 5, buffers out of band)."""
    buffers: list = []
    head = pickle.dumps(obj, protocol=5, buffer_callback=buffers.append)
    return framed(head, *(bytes(b.raw()) for b in buffers))


def deep_list_pickle(depth: int) -> bytes:
    """A pickle of ``[[[...]]]`` nested ``depth`` deep, written opcode by opcode
    (pickling such a list would overflow the pickler's recursion)."""
    return b"\x80\x05" + b"]" * depth + b"a" * (depth - 1) + b"."


def host_port(address: str) -> tuple[str, int]:
    proto, loc = parse_address(address)
    assert proto == "tcp"
    return parse_host_port(loc)


class Peer:
    """One connection to a server on the event loop the servers run on."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.loop = asyncio.get_running_loop()
        self.reset = False

    @classmethod
    async def connect(cls, address: str) -> Peer:
        loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            await asyncio.wait_for(loop.sock_connect(sock, host_port(address)), CLOSE_DEADLINE)
        except BaseException:
            sock.close()
            raise
        return cls(sock)

    async def send(self, data: bytes) -> bool:
        """Send; False if the server already closed on us (a fine answer to garbage)."""
        if self.reset:
            return False
        try:
            await asyncio.wait_for(self.loop.sock_sendall(self.sock, data), CLOSE_DEADLINE)
        except (BrokenPipeError, ConnectionResetError):
            self.reset = True
            return False
        return True

    async def read_message(self):
        """One reply, or None if the server closed the connection."""
        try:
            magic, n = HEADER.unpack(await self._exactly(HEADER.size))
            assert magic == MAGIC and 0 < n <= MAX_FRAMES, (magic, n)
            lengths = struct.unpack(f"<{n}Q", await self._exactly(8 * n))
            frames = [await self._exactly(length) for length in lengths]
        except EOFError:
            return None
        return pickle.loads(frames[0], buffers=frames[1:])

    async def _exactly(self, n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            try:
                chunk = await asyncio.wait_for(self.loop.sock_recv(self.sock, n - len(buf)),
                                               CLOSE_DEADLINE)
            except ConnectionResetError:
                raise EOFError from None
            if not chunk:
                raise EOFError
            buf += chunk
        return bytes(buf)

    async def finish(self, how: str = "eof") -> None:
        """End the connection: ``eof`` (half-close, then the server must close
        within the deadline), ``close`` or ``reset`` (an RST, no goodbye)."""
        try:
            if how == "eof" and not self.reset:
                try:
                    self.sock.shutdown(socket.SHUT_WR)
                except OSError:
                    return
                deadline = self.loop.time() + CLOSE_DEADLINE
                while True:
                    try:
                        chunk = await asyncio.wait_for(self.loop.sock_recv(self.sock, 65536),
                                                       max(deadline - self.loop.time(), 0.001))
                    except ConnectionResetError:
                        return
                    except asyncio.TimeoutError:
                        raise AssertionError(
                            f"the server kept the connection open {CLOSE_DEADLINE}s after our EOF"
                        ) from None
                    if not chunk:
                        return
            elif how == "reset":
                self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        finally:
            self.sock.close()


# ----------------------------------------------------------------------------- strategies

FINISH = st.sampled_from(["eof", "eof", "close", "reset"])

#: Lengths and counts that sit on the boundaries the parser checks.
INTERESTING_LENGTHS = [0, 1, 7, 8, 64 * 1024 - 1, 64 * 1024, 1 << 20, MAX_MESSAGE_SIZE - 1,
                       MAX_MESSAGE_SIZE, MAX_MESSAGE_SIZE + 1, 2**32 - 1, 2**32, 2**63 - 1,
                       2**63, 2**64 - 1]
INTERESTING_COUNTS = [0, 1, 2, 3, MAX_FRAMES - 1, MAX_FRAMES, MAX_FRAMES + 1, 2**31, 2**32 - 1]

keys = st.one_of(
    st.text(max_size=6), st.integers(-3, 3), st.binary(max_size=4), st.floats(allow_nan=True),
    st.tuples(st.text(max_size=3), st.integers(0, 3)), st.sampled_from(["x", "y", ("t", 0)]),
)
scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.integers(min_value=2**64, max_value=2**80),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12), st.binary(max_size=32),
)
#: Anything picklable without imports: what a confused or hostile peer might put in a field.
values = st.recursive(
    scalars | keys,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.tuples(inner, inner),
        st.dictionaries(keys, inner, max_size=4),
        st.frozensets(st.integers(), max_size=3),
        st.sets(keys, max_size=3),
    ),
    max_leaves=12,
)
#: Values with the right outer shape for keyed fields, and wrong insides.
keyed_values = st.one_of(
    st.lists(keys, max_size=4),
    st.dictionaries(keys, values, max_size=4),
    st.dictionaries(keys, st.lists(keys, max_size=3), max_size=3),
    st.dictionaries(keys, st.tuples(st.binary(max_size=16), st.binary(max_size=16)), max_size=3),
    st.lists(st.dictionaries(keys, values, max_size=2), min_size=1, max_size=2),  # keys as dicts
    values,
)
field_names = st.one_of(st.text(max_size=10), st.sampled_from(["op", "reply", "keys", "key"]))


def op_parameters(ops: dict[str, Callable | None]) -> dict[str, list[str]]:
    """Each operation's field names, read off its handler's signature."""
    out = {}
    for op, handler in ops.items():
        if op in AUTHORISED_ACTIONS or op in WAITING_ACTIONS or handler is None:
            out[op] = []
            continue
        try:
            params = inspect.signature(handler).parameters
        except (TypeError, ValueError):
            params = {}
        out[op] = [p for p, v in params.items()
                   if v.kind not in (v.VAR_KEYWORD, v.VAR_POSITIONAL) and p != "comm"]
    return out


@st.composite
def messages(draw, ops: dict[str, list[str]]):
    """A message for a dispatcher that knows ``ops``: mostly the wrong shape."""
    kind = draw(st.sampled_from(["known", "known", "known", "unknown", "bad-op", "not-a-dict"]))
    if kind == "not-a-dict":
        return draw(values)
    if kind == "bad-op":
        op = draw(st.one_of(scalars.filter(lambda v: not isinstance(v, str)), st.lists(keys, max_size=2)))
    elif kind == "unknown":
        op = draw(st.text(max_size=20).filter(lambda s: s not in ops))
    else:
        op = draw(st.sampled_from(sorted(o for o in ops if o not in AUTHORISED_ACTIONS
                                         and o not in WAITING_ACTIONS)))
    msg: dict = {"op": op}
    names = (ops.get(op) if isinstance(op, str) else None) or ["x"]
    for name in draw(st.lists(st.sampled_from(names), unique=True, max_size=6)):
        msg[name] = draw(keyed_values)
    if draw(st.booleans()):
        msg.update(draw(st.dictionaries(st.one_of(field_names, st.integers()), values, max_size=2)))
        msg["op"] = op
    return msg


#: A few keys, so that messages of one example talk about the same tasks.
ALPHABET = ["a", "b", "c", ("t", 0), ("t", 1), 7]
alphabet = st.sampled_from(ALPHABET)


def _recipes():
    from cluster.runtime.comm.serialize import dumps_function
    from cluster.runtime.execution import dumps_args

    good = (dumps_function(inc), dumps_args((1,), {}))
    return st.one_of(st.just(good), st.tuples(st.binary(max_size=24), st.binary(max_size=24)))


@st.composite
def plausible_client_messages(draw):
    """Client stream messages of the right shape about a few keys: they reach the state."""
    op = draw(st.sampled_from(["update_graph", "update_graph", "client_releases_keys",
                               "heartbeat_client"]))
    if op == "client_releases_keys":
        return {"op": op, "keys": draw(st.lists(alphabet, max_size=3))}
    if op == "heartbeat_client":
        return {"op": op}
    tasks = draw(st.dictionaries(alphabet, _recipes(), max_size=4))
    return {
        "op": op,
        "tasks": tasks,
        "keys": draw(st.lists(alphabet, max_size=4)),
        "dependencies": draw(st.dictionaries(alphabet, st.lists(alphabet, max_size=2), max_size=3)),
        "restrictions": draw(st.dictionaries(alphabet, st.lists(st.sampled_from(
            ["w0", "tcp://fuzz.invalid:1", "127.0.0.1", "nowhere"]), max_size=2), max_size=2)),
        "loose_restrictions": draw(st.lists(alphabet, max_size=2)),
        "resources": draw(st.dictionaries(alphabet, st.dictionaries(
            st.sampled_from(["GPU", "MEM"]), st.floats(0, 4)), max_size=2)),
        "retries": draw(st.dictionaries(alphabet, st.integers(0, 2), max_size=2)),
        "user_priority": draw(st.one_of(st.integers(-5, 5),
                                        st.dictionaries(alphabet, st.integers(-5, 5), max_size=2))),
    }


@st.composite
def plausible_worker_messages(draw):
    """Worker stream messages of the right shape about a few keys."""
    op = draw(st.sampled_from(["task_finished", "task_finished", "task_erred", "add_keys",
                               "missing_data", "release_worker_data", "reschedule",
                               "long-running", "heartbeat", "worker_status_change"]))
    key = draw(alphabet)
    msg = {
        "task_finished": lambda: {"key": key, "nbytes": draw(st.integers(-1, 2**40)),
                                  "type": "int", "startstops": [("compute", 1.0, 1.5)],
                                  "data": draw(st.one_of(st.none(), st.just(pickle.dumps(5)),
                                                         st.binary(max_size=8)))},
        "task_erred": lambda: {"key": key, "exception": ValueError("fuzz"), "traceback": "",
                               "startstops": []},
        "add_keys": lambda: {"keys": draw(st.lists(alphabet, max_size=3))},
        "missing_data": lambda: {"key": key, "errant_worker": draw(st.one_of(
            st.none(), st.sampled_from(["tcp://fuzz.invalid:1", "tcp://127.0.0.1:1"])))},
        "release_worker_data": lambda: {"key": key},
        "reschedule": lambda: {"key": key},
        "long-running": lambda: {"key": key, "compute_duration": draw(st.one_of(
            st.none(), st.floats(0, 10)))},
        "heartbeat": lambda: {"metrics": {"memory": draw(st.integers(0, 2**40)), "time": 1.0}},
        "worker_status_change": lambda: {"status": draw(st.sampled_from(
            ["running", "paused", "closing_gracefully"]))},
    }[op]()
    return {"op": op, **msg, "stimulus_id": "fuzz"}


def random_bytes():
    return st.one_of(
        st.binary(max_size=2048),
        st.binary(max_size=512).map(lambda b: MAGIC + b),
        st.binary(max_size=64).map(lambda b: MAGIC[: len(b) % 4] + b),
    )


@st.composite
def bad_headers(draw):
    """The magic, a frame count and lengths drawn from the parser's boundaries, then bytes."""
    n = draw(st.one_of(st.sampled_from(INTERESTING_COUNTS), st.integers(0, 2**32 - 1),
                       st.integers(0, 8)))
    k = min(n, draw(st.integers(0, 6)))
    lengths = draw(st.lists(st.one_of(st.sampled_from(INTERESTING_LENGTHS),
                                      st.integers(0, 2**64 - 1), st.integers(0, 100)),
                            min_size=k, max_size=k))
    tail = draw(st.binary(max_size=256))
    return HEADER.pack(MAGIC, n) + struct.pack(f"<{k}Q", *lengths) + tail


@st.composite
def framed_garbage(draw):
    """Correct framing around random payloads (not pickles, or broken ones)."""
    frames = draw(st.lists(st.binary(max_size=300), min_size=1, max_size=4))
    if draw(st.booleans()):
        # A real pickle, mutated: one byte flipped or the end cut off.
        head = bytearray(pickle.dumps(draw(values), protocol=5))
        if draw(st.booleans()) and head:
            i = draw(st.integers(0, len(head) - 1))
            head[i] ^= draw(st.integers(1, 255))
        else:
            head = head[: draw(st.integers(0, len(head)))]
        frames[0] = bytes(head)
    return framed(*frames)


@st.composite
def truncated(draw, ops: dict[str, list[str]]):
    """A valid message cut short; the connection then ends in one of three ways."""
    data = message_bytes(draw(messages(ops)))
    return data[: draw(st.integers(0, max(len(data) - 1, 0)))], draw(FINISH)


# ----------------------------------------------------------------------------- the run


def fuzz_settings(n: int = EXAMPLES):
    return settings(
        max_examples=n, deadline=None, derandomize=True, database=None,
        suppress_health_check=list(HealthCheck), print_blob=True,
    )


def run_fuzz(loop: asyncio.AbstractEventLoop, address: str, ops: dict[str, list[str]],
             client_ops: dict[str, list[str]] | None,
             worker_ops: dict[str, list[str]] | None) -> dict[str, int]:
    """All case families against one server; returns how many examples each ran.

    Hypothesis runs here, on the main thread; each example runs to its end on
    ``loop``, where the servers live (they make no progress between examples,
    which costs nothing: nothing in them is timed that finely).
    """
    counts: dict[str, int] = {}
    seconds: dict[str, float] = {}

    only = os.environ.get("HPC_FUZZ_FAMILIES")  # comma-separated, for debugging one family

    def family(name: str, strategy, n: int = EXAMPLES):
        def decorate(body):
            if only and name not in only.split(","):
                return body
            @fuzz_settings(n)
            @given(strategy)
            def run(case):
                counts[name] = counts.get(name, 0) + 1
                loop.run_until_complete(asyncio.wait_for(body(case), 4 * CLOSE_DEADLINE))

            t0 = time.monotonic()
            run()
            seconds[name] = round(time.monotonic() - t0, 1)
            return body

        return decorate

    @family("random-bytes", st.tuples(random_bytes(), FINISH))
    async def _(case):
        data, how = case
        peer = await Peer.connect(address)
        await peer.send(data)
        await peer.finish(how)

    @family("bad-header", st.tuples(bad_headers(), FINISH))
    async def _(case):
        data, how = case
        peer = await Peer.connect(address)
        await peer.send(data)
        await peer.finish(how)

    @family("framed-garbage", st.lists(framed_garbage(), min_size=1, max_size=3))
    async def _(case):
        peer = await Peer.connect(address)
        for data in case:
            await peer.send(data)
        await peer.finish("eof")

    @family("wrong-shape", st.lists(messages(ops), min_size=1, max_size=4))
    async def _(case):
        peer = await Peer.connect(address)
        for msg in case:
            if not await peer.send(message_bytes(msg)):
                break
            op = msg.get("op") if isinstance(msg, dict) else None
            if isinstance(op, str) and op in ops and msg.get("reply", True) is True:
                reply = await peer.read_message()  # a known op answers, or closes
                if reply is None:
                    break
                assert isinstance(reply, tuple) and reply[0] in ("OK", "error"), reply
        await peer.finish("eof")

    @family("truncated", truncated(ops))
    async def _(case):
        data, how = case
        peer = await Peer.connect(address)
        await peer.send(data)
        await peer.finish(how)

    if client_ops is not None:
        @family("client-stream", st.tuples(st.text(max_size=8),
                                           st.lists(st.one_of(st.lists(messages(client_ops), max_size=4),
                                                              values), min_size=1, max_size=3)))
        async def _(case):
            name, batches = case
            peer = await Peer.connect(address)
            await peer.send(message_bytes({"op": "register_client", "client": f"fuzz-client-{name}"}))
            reply = await peer.read_message()
            assert reply is not None and reply[0] == "OK", reply
            for batch in batches:
                if not await peer.send(message_bytes(batch)):
                    break
            await peer.finish("eof")

    if worker_ops is not None:
        registration = st.fixed_dictionaries({}, optional={
            "nthreads": st.one_of(st.integers(-2, 4), values),
            "name": values, "memory_limit": st.one_of(st.integers(-1, 2**40), values),
            "resources": values, "host": values, "keys": keyed_values, "nbytes": keyed_values,
            "services": values, "pid": values, "nanny": values, "local_directory": values,
        })

        @family("worker-stream", st.tuples(st.integers(1, 65535), registration,
                                           st.lists(st.one_of(st.lists(messages(worker_ops), max_size=4),
                                                              values), min_size=0, max_size=3)),
                n=max(EXAMPLES // 2, 1))
        async def _(case):
            port, fields, batches = case
            peer = await Peer.connect(address)
            await peer.send(message_bytes({"op": "register_worker", **fields,
                                     "address": f"tcp://fuzz.invalid:{port}"}))
            reply = await peer.read_message()
            if reply is not None and reply[0] == "OK":
                for batch in batches:
                    if not await peer.send(message_bytes(batch)):
                        break
            await peer.finish("eof")

    if client_ops is not None and worker_ops is not None:
        @family("client-and-worker", st.tuples(
            st.integers(1, 65535), st.integers(1, 4),
            st.lists(st.one_of(st.tuples(st.just("client"), st.lists(plausible_client_messages(),
                                                                      min_size=1, max_size=3)),
                               st.tuples(st.just("worker"), st.lists(plausible_worker_messages(),
                                                                     min_size=1, max_size=3))),
                     min_size=1, max_size=6),
            st.sampled_from(["worker-first", "client-first"])))
        async def _(case):
            # A client and a worker that say plausible but random things about the same
            # few keys: placement, results, errors, lost data, releases, in any order.
            port, nthreads, batches, order = case
            client, worker = await Peer.connect(address), await Peer.connect(address)
            await client.send(message_bytes({"op": "register_client", "client": f"fuzz-client-{port}"}))
            reply = await client.read_message()
            assert reply is not None and reply[0] == "OK", reply
            await worker.send(message_bytes({"op": "register_worker", "nthreads": nthreads,
                                       "name": f"fuzz-{port}",
                                       "address": f"tcp://fuzz.invalid:{port}"}))
            reply = await worker.read_message()
            assert reply is not None and reply[0] == "OK", reply
            for who, batch in batches:
                await (client if who == "client" else worker).send(message_bytes(batch))
            first, second = (worker, client) if order == "worker-first" else (client, worker)
            await first.finish("eof")
            await second.finish("eof")

    @family("many-connections", st.lists(st.one_of(random_bytes(), bad_headers(), truncated(ops)
                                                   .map(lambda c: c[0])), min_size=20, max_size=60),
            n=max(EXAMPLES // 25, 2))
    async def _(case):
        peers = [await Peer.connect(address) for _ in case]
        try:
            for peer, data in zip(peers, case, strict=True):
                await peer.send(data)
        finally:
            for peer in peers:
                await peer.finish("eof")

    logging.getLogger(__name__).warning("seconds per family: %s", seconds)
    return counts


async def until_described(predicate, what: str, describe: Callable[[], str],
                          timeout: float = 10.0) -> None:
    """``until``, with a description of the state made when it times out."""
    try:
        await until(predicate, timeout=timeout, what=what)
    except AssertionError as e:
        raise AssertionError(f"{e}: {describe()}") from None


def describe_worker_tasks(w, s) -> str:
    return "; ".join(f"{ts!r} story {w.state.story(ts.key)[-6:]}; scheduler story "
                     f"{[e[1:3] + e[4:5] for e in s.story(ts.key)[-12:]]}"
                     for ts in list(w.state.tasks.values())[:3])


def describe_tasks(s) -> str:
    return "; ".join(
        f"{ts.key!r} {ts.state} wanted by {[c.client_key for c in ts.who_wants]} "
        f"dependents {[d.key for d in ts.dependents]} story {s.story(ts.key)[-4:]}"
        for ts in list(s.tasks.values())[:3])


def fds() -> int:
    return psutil.Process().num_fds()


class LogTally(logging.Handler):
    """Renders every record of the servers' loggers, counts them, and keeps only errors.

    Rendering shows a log line that cannot be rendered (a peer's data with a
    failing or endless repr).  Keeping only errors matters: pytest keeps every
    record of a test, and each of thousands of warnings would hold on to the
    peer's data it mentions (75 MB per 2500 cases), which the RSS check would
    count against the servers.
    """

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.counts: collections.Counter = collections.Counter()
        self.errors: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        text = self.format(record)
        self.counts[record.levelname] += 1
        if record.levelno >= logging.ERROR:
            self.errors.append(text[:2000])

    def handleError(self, record: logging.LogRecord) -> None:  # noqa: N802 - logging's name
        self.errors.append(f"could not render a log record: {record.msg!r}")


def connections() -> set:
    return {(c.laddr, c.raddr, c.status) for c in psutil.Process().net_connections(kind="inet")}


def rss() -> int:
    return psutil.Process().memory_info().rss


@pytest.mark.parametrize("target", ["scheduler", "worker"])
@pytest.mark.timeout(300)
def test_fuzz_servers_stay_up_and_leak_nothing(target):
    tally = LogTally()
    runtime_log, asyncio_log = logging.getLogger("cluster.runtime"), logging.getLogger("asyncio")
    runtime_log.addHandler(tally)
    asyncio_log.addHandler(tally)
    runtime_log.propagate = False
    loop = asyncio.new_event_loop()

    def run(coro, timeout: float = 60):
        return loop.run_until_complete(asyncio.wait_for(coro, timeout))

    cluster = gen_cluster(nworkers=1)
    c, s, (w,) = run(cluster.__aenter__())
    try:
        server = s if target == "scheduler" else w

        async def warm_up():
            # Every connection a normal round trip needs, before the baseline.
            assert await c.submit(inc, 1) == 2
            assert await c.gather(c.map(inc, range(5))) == list(range(1, 6))
            await until(lambda: not s.tasks, what="warm-up tasks to be forgotten")

        def pools():
            return {name: {a: [cm.local_address for cm in q] for a, q in pool.idle.items()}
                    for name, pool in [("s", s.rpc), ("w", w.rpc), ("c", c.rpc)]}

        def pooled() -> int:
            """Connections kept for reuse (bounded per address): not leaks.  Both ends
            of each are in this process."""
            return sum(len(q) for pool in (s.rpc, w.rpc, c.rpc) for q in pool.idle.values())

        run(warm_up())
        fds0, rss0, conns0, pooled0 = fds(), rss(), connections(), pooled()
        clients0, workers0 = set(s.state.clients), set(s.state.workers)

        t0 = time.monotonic()
        counts = run_fuzz(loop, server.address, op_parameters(server.handlers),
                          op_parameters(s.client_ops) if target == "scheduler" else None,
                          op_parameters(s.worker_ops) if target == "scheduler" else None)
        elapsed = time.monotonic() - t0
        logging.getLogger(__name__).warning(
            "fuzz of the %s: %d examples (%s) in %.1fs", target, sum(counts.values()), counts,
            elapsed)

        async def check():
            # The servers are up and serve a normal client.
            assert s.status == "running" and w.status == "running"
            assert await asyncio.wait_for(c.submit(inc, 41), 10) == 42
            futures = c.map(inc, range(20))
            assert await asyncio.wait_for(c.gather(futures), 10) == list(range(1, 21))
            del futures
            # Every fuzzing peer is forgotten: no half-registered clients or workers,
            # no orphaned tasks (the normal client released everything it had).
            await until_described(lambda: set(s.state.clients) == clients0,
                                  "fuzz clients to be forgotten",
                                  lambda: str(set(s.state.clients) - clients0))
            await until_described(lambda: set(s.state.workers) == workers0,
                                  "fuzz workers to be forgotten",
                                  lambda: str(set(s.state.workers) - workers0))
            await until_described(lambda: not s.tasks, "orphaned tasks to go",
                                  lambda: describe_tasks(s))
            await until_described(lambda: not w.state.tasks, "the worker's tasks to go",
                                  lambda: describe_worker_tasks(w, s))
            validation.validate_state(s.state)
            worker_validation.validate_state(w.state)
            # Every comm the fuzz opened is closed again.
            await until_described(lambda: fds() <= fds0 + 2 * max(0, pooled() - pooled0),
                                  f"file descriptors back to {fds0} (and pooled connections)",
                                  lambda: f"now {fds()}; new connections "
                                          f"{connections() - conns0}; gone {conns0 - connections()}; "
                                          f"s={s.address} w={w.address} pools {pools()}")
            assert rss() - rss0 < 200 * MB, f"RSS grew by {(rss() - rss0) / MB:.0f} MB"

        run(check())
    finally:
        try:
            run(cluster.__aexit__(None, None, None))
        finally:
            loop.run_until_complete(loop.shutdown_default_executor())
            loop.close()
            runtime_log.propagate = True
            runtime_log.removeHandler(tally)
            asyncio_log.removeHandler(tally)
    if not os.environ.get("HPC_FUZZ_FAMILIES"):
        assert sum(counts.values()) >= 5 * EXAMPLES
    # Nothing broke inside a server: closing a bad connection is a warning, not an error.
    assert not tally.errors, tally.errors[:5]
    assert tally.counts["WARNING"] > EXAMPLES  # the bad connections were noticed
