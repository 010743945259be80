"""Bounds on connections that have not yet proven who they are.

A peer that opens a TCP connection to a TLS listener and then sends nothing
(or half a ClientHello) costs the server a descriptor and the memory of a TLS
state machine -- about 110 KB with asyncio's and uvloop's 256 KiB receive
buffer -- until the handshake times out.  Thousands of them (anyone on the
machine can open them: no credentials needed) cost hundreds of megabytes and
every descriptor of the process.  :class:`Admission` bounds that:

* **At most** ``max_pending`` **unauthenticated connections at a time, and
  at most** ``max_per_peer`` **from one peer host.**  A connection over
  either cap makes room by cutting the oldest pending one (of that peer, for
  the per-peer cap) if that one has waited at least :data:`EVICT_AFTER`
  seconds -- a real handshake takes milliseconds, so what is cut is a
  stalled one, and a newcomer (a real client among a flood) still gets in.
  If the oldest is younger than that, the newcomer is closed at once (its
  ``connect`` retries).
* **Failures are logged at a bounded rate.**  In each :data:`LOG_INTERVAL`
  the first failure of each distinct reason (up to :data:`FULL_LINES` of
  them) is logged in full, with the peer's address; the others are counted,
  and one WARNING line per interval gives the count, the reasons, some of the
  addresses, and how many connections the caps closed.  (Unbounded, a flood
  wrote 17,700 lines in 20 s.)
* **Memory goes back after a flood.**  glibc keeps freed heap memory for
  reuse, so the RSS of a server that held thousands of handshakes stayed high
  after they were gone; once the pending connections have drained after at
  least :data:`TRIM_AFTER` failures, :func:`cluster.runtime.utils.trim_memory` hands
  it back (as the worker does after spilling).

The owner registers each accepted connection with :meth:`Admission.admit`
(with a callback that cuts it), calls :meth:`Admission.done` when its
handshake succeeded or failed, and :meth:`Admission.close` when it stops.
Everything runs on the event loop thread.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from ..system import trim_memory

logger = logging.getLogger(__name__)

#: Unauthenticated connections a listener holds at most.
MAX_PENDING = 512
#: Of those, at most this many from one peer host.
MAX_PENDING_PER_PEER = 128
#: A pending connection may be cut to make room once it has waited this long (seconds).
EVICT_AFTER = 1.0
#: Seconds per summary line of failures.
LOG_INTERVAL = 5.0
#: Failures logged in full per interval (the first of each distinct reason).
FULL_LINES = 8
#: Return freed memory to the system once this many failures have drained.
TRIM_AFTER = 64
#: Peer addresses a summary line names.
EXAMPLE_PEERS = 3


@dataclass
class _Pending:
    peer: str
    since: float
    cut: Callable[[], None]


class Admission:
    """Caps and rate-limited failure logging for one listener's pending connections.

    Args:
        name: the listener, for log lines (its address).
        what: what is pending, for log lines (``"TLS handshake"``).
        max_pending: most pending connections (default :data:`MAX_PENDING`).
        max_per_peer: most from one peer host (default :data:`MAX_PENDING_PER_PEER`).
        log: the logger to write to.
    """

    def __init__(self, name: str, what: str = "TLS handshake", max_pending: int | None = None,
                 max_per_peer: int | None = None, log: logging.Logger | None = None):
        self.name = name
        self.what = what
        self.max_pending = max_pending or MAX_PENDING
        self.max_per_peer = max_per_peer or MAX_PENDING_PER_PEER
        self.log = log or logger
        self._pending: dict[int, _Pending] = {}  # insertion order: oldest first
        self._per_peer: Counter[str] = Counter()
        self._tokens = itertools.count()
        # this interval's failures beyond the full lines, and connections the caps closed
        self._reasons: Counter[tuple[str, str]] = Counter()  # (label, reason)
        self._peers: Counter[tuple[str, str]] = Counter()  # (label, address)
        self._refused = 0
        self._cut = 0
        self._logged: set[tuple[str, str]] = set()
        self._timer: asyncio.TimerHandle | None = None
        self._since_trim = 0
        #: Totals since the start, for tests and diagnostics.
        self.failed_total = 0
        self.refused_total = 0
        self.cut_total = 0

    @property
    def pending(self) -> int:
        """Connections registered and not yet done."""
        return len(self._pending)

    # ------------------------------------------------------------------ admission

    def admit(self, peer: str, cut: Callable[[], None]) -> int | None:
        """Register a new connection from host ``peer``; ``cut()`` closes it if it must make room.

        Returns:
            A token for :meth:`done`, or ``None``: no room, close the connection now.
        """
        now = time.monotonic()
        if self._per_peer[peer] >= self.max_per_peer and not self._evict(now, peer):
            self._note_refused()
            return None
        if len(self._pending) >= self.max_pending and not self._evict(now, None):
            self._note_refused()
            return None
        token = next(self._tokens)
        self._pending[token] = _Pending(peer, now, cut)
        self._per_peer[peer] += 1
        return token

    def _evict(self, now: float, peer: str | None) -> bool:
        """Cut the oldest pending connection (of ``peer``) if it has waited long enough."""
        for token, entry in self._pending.items():
            if peer is not None and entry.peer != peer:
                continue
            if now - entry.since < EVICT_AFTER:
                return False
            self._release(token)
            self._cut += 1
            self.cut_total += 1
            self._since_trim += 1
            self._arm()
            entry.cut()
            return True
        return False  # pragma: no cover - the caps imply an entry

    def refuse(self) -> None:
        """Count a connection closed at once for another cap of the owner's (logged per interval)."""
        self._note_refused()

    def _note_refused(self) -> None:
        self._refused += 1
        self.refused_total += 1
        self._since_trim += 1
        self._arm()

    def _release(self, token: int) -> _Pending | None:
        entry = self._pending.pop(token, None)
        if entry is not None:
            n = self._per_peer[entry.peer] - 1
            if n > 0:
                self._per_peer[entry.peer] = n
            else:
                del self._per_peer[entry.peer]
        return entry

    def done(self, token: int, address: str = "", error: BaseException | str | None = None) -> None:
        """The connection of ``token`` finished its handshake (``error``: it failed).

        A failure of a connection that was cut to make room is not logged again.

        Args:
            token: from :meth:`admit`.
            address: the peer's address (``host:port``), for the log.
            error: why it failed (an exception or its description).
        """
        entry = self._release(token)
        if entry is None or error is None:
            return
        self.failed(address or entry.peer, error)

    def failed(self, address: str, error: BaseException | str, label: str = "",
               template: str = "") -> None:
        """Log (at a bounded rate) that the connection from ``address`` failed: ``error``.

        Args:
            address: the peer's ``host:port``.
            error: an exception or the reason as text.
            label: what happened, for the summary line (default ``"<what>s failed"``).
            template: the full line, with ``{address}`` and ``{reason}`` (default:
                ``"<what> with {address} failed; connection closed unread: {reason}"``).
        """
        reason = error if isinstance(error, str) else describe(error)
        label = label or f"{self.what}s failed"
        self.failed_total += 1
        self._since_trim += 1
        self._arm()
        if (label, reason) not in self._logged and len(self._logged) < FULL_LINES:
            self._logged.add((label, reason))
            text = (template or f"{self.what} with {{address}} failed; connection closed "
                    "unread: {reason}").format(address=address, reason=reason)
            self.log.warning("%s: %s", self.name, text)
            return
        self._reasons[label, reason] += 1
        self._peers[label, address] += 1

    # ------------------------------------------------------------------ the log

    def _arm(self) -> None:
        if self._timer is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:  # pragma: no cover - always called on the loop
                return
            self._timer = loop.call_later(LOG_INTERVAL, self._flush)

    def _flush(self) -> None:
        """Log this interval's counts (if any) and start the next interval (if anything happened)."""
        self._timer = None
        busy = self._summarise(LOG_INTERVAL)
        self._logged.clear()
        if self._since_trim >= TRIM_AFTER and len(self._pending) < 8:
            self._since_trim = 0
            trim_memory()
        if busy or self._pending:
            self._arm()

    def _summarise(self, seconds: float | None) -> bool:
        if not (self._reasons or self._refused or self._cut):
            return False
        parts = []
        for label in dict.fromkeys(label for label, _ in self._reasons):
            reasons = Counter({r: n for (lb, r), n in self._reasons.items() if lb == label})
            peers = Counter({a: n for (lb, a), n in self._peers.items() if lb == label})
            text = ", ".join(f"{r} x{n}" for r, n in reasons.most_common(4))
            if len(reasons) > 4:
                text += ", ..."
            who = ", ".join(a for a, _ in peers.most_common(EXAMPLE_PEERS))
            if len(peers) > EXAMPLE_PEERS:
                who += f" and {len(peers) - EXAMPLE_PEERS} more"
            parts.append(f"{sum(reasons.values())} more {label} ({text}), from {who}")
        if self._refused or self._cut:
            parts.append(f"{self._refused + self._cut} connections were closed unread to stay "
                         f"within {self.max_pending} pending {self.what}s ({self.max_per_peer} "
                         "per peer host)")
        when = f"in the last {seconds:g} s" if seconds else "before closing"
        self.log.warning("%s: %s, %s", self.name, when, "; ".join(parts))
        self._reasons.clear()
        self._peers.clear()
        self._refused = self._cut = 0
        return True

    def close(self) -> None:
        """Log what is still counted and stop the interval timer.  Idempotent."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._summarise(None)
        self._pending.clear()
        self._per_peer.clear()
        if self._since_trim >= TRIM_AFTER:
            self._since_trim = 0
            trim_memory()


def describe(exc: BaseException) -> str:
    """A short description of a handshake failure (the OpenSSL reason when there is one)."""
    import ssl

    if isinstance(exc, ssl.SSLError) and exc.reason:
        return f"{type(exc).__name__}: {exc.reason}"
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


__all__ = ["Admission", "describe"]
