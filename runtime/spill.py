"""The worker's data store: a mapping that spills least-recently-used values to disk.

:class:`SpillBuffer` is what ``worker.data`` is for dask.distributed users: a
``MutableMapping`` from task keys to values with two tiers, ``.memory`` and
``.disk``.  Every key lives in exactly one tier.

Theory of operation:

* **Memory tier** – an ``OrderedDict`` kept in least-recently-used order
  (oldest first).  Each value's size is measured once, with
  :func:`cluster.runtime.execution.sizeof`, when it arrives; ``memory_total`` is the sum.
  Reading a key through the buffer (``data[key]``) makes it the most recent.
* **Spilling** – after an insert, while ``memory_total > target``, the least
  recently used value is written to disk (:meth:`SpillBuffer.evict`).  A value
  that is alone bigger than ``target`` goes straight to disk, so it does not
  push everything else out first.  The worker's memory monitor also calls
  :meth:`~SpillBuffer.evict` directly when the process (as psutil sees it)
  is above its spill fraction.
* **Disk tier** – one file per key in ``spill_directory``, named by a hash of
  the key, so any hashable key is safe.  A file is a small header (frame count
  and frame lengths) followed by the frames of :func:`cluster.runtime.comm.serialize.dumps`:
  the pickle stream, then the protocol-5 out-of-band buffers (NumPy arrays,
  large ``bytes``), each at a 64-byte aligned offset.  Buffers are written
  from where they sit in memory and read back into one ``bytearray`` that the
  unpickled arrays then use in place; there is no extra copy either way.
  ``disk_total`` is the sum of the file sizes.
* **Unspilling** – reading a spilled key through the buffer loads it, deletes
  its file and puts it back in memory as the most recent value, which may push
  others out.  A value bigger than ``target`` is returned but left on disk.
  ``.disk[key]`` reads a value without moving it.
* **What cannot spill** – a value that does not pickle (a lock, an object whose
  ``__reduce__`` raises) stays in memory: a warning naming the key is logged
  once and later evictions skip it until the key is set again.  When writing a
  value would take the disk tier over ``max_spill`` (or the disk write fails),
  the value stays in memory, eviction stops for now, and a warning is logged
  the first time.
* **A full disk** -- a write that fails with ``ENOSPC`` or ``EDQUOT`` -- is an
  error the user must see: it is logged at ERROR with the file's path (once
  per episode, at most once a minute), :attr:`SpillBuffer.no_space` holds the
  reason, and the ``on_no_space`` callback gets it (the worker pauses and
  reports it).  :meth:`SpillBuffer.check_space`, called periodically, ends the
  episode (callback with ``None``) once nothing needs spilling any more or a
  spill succeeds again.
* **Files** – the spill directory is created 0700 (or, if it exists, must be
  ours, not a link, and not writable by others: :func:`cluster.runtime.files.open_private_directory`)
  and held open; every spill file is created relative to that descriptor
  with ``O_EXCL|O_NOFOLLOW`` and mode 0600, read with ``O_NOFOLLOW``, and
  removed relative to it.  Nobody else can read a spilled value, or swap in
  a file (or the directory) of their own for us to unpickle.
* **Threads** – all state is guarded by one ``threading.RLock``: the event loop
  inserts results while task threads read their dependencies.  Disk I/O happens
  under the lock, which keeps the two tiers consistent at the price of
  serialising spills and unspills.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import struct
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator, Mapping, MutableMapping
from typing import Any

from .comm.serialize import box_large, dumps, loads, nbytes
from .execution import sizeof as default_sizeof
from .files import O_CLOEXEC, O_NOFOLLOW, create_private_file, open_private_directory

logger = logging.getLogger(__name__)

#: File layout: magic, frame count, then one little-endian u64 length per frame.
_MAGIC = b"SPL1"
_HEAD = struct.Struct("<4sI")
#: Every frame starts at a multiple of this offset in the file (and in the read buffer).
_ALIGN = 64

# Outcomes of one attempt to write a value to disk.
_SPILLED = "spilled"
_UNPICKLABLE = "unpicklable"
_NO_ROOM = "no-room"

_missing = object()

#: Errors of a write that mean the file system (or our quota on it) is full.
_NO_SPACE_ERRNOS = frozenset({errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)})
#: A full disk is logged at ERROR at most this often (seconds); in between at WARNING.
NO_SPACE_ERROR_INTERVAL = 60.0


def _round_up(n: int) -> int:
    return (n + _ALIGN - 1) // _ALIGN * _ALIGN


def _layout(lengths: list[int]) -> tuple[list[int], int]:
    """Offsets of the frames and the total file size for frames of ``lengths``."""
    pos = _round_up(_HEAD.size + 8 * len(lengths))
    offsets = []
    end = pos
    for n in lengths:
        offsets.append(pos)
        end = pos + n
        pos = _round_up(end)
    return offsets, end


def _write_all(fd: int, data) -> None:
    view = memoryview(data).cast("B")
    while view.nbytes:
        view = view[os.write(fd, view):]


class _MemoryView(Mapping):
    """Read-only view of the in-memory values, least recently used first.

    Reading through it does not change the LRU order.
    """

    def __init__(self, owner: SpillBuffer):
        self._owner = owner

    def __getitem__(self, key: Hashable) -> Any:
        with self._owner._lock:
            return self._owner._fast[key]

    def __contains__(self, key: object) -> bool:
        with self._owner._lock:
            return key in self._owner._fast

    def __iter__(self) -> Iterator[Hashable]:
        with self._owner._lock:
            keys = list(self._owner._fast)
        return iter(keys)

    def __len__(self) -> int:
        return len(self._owner._fast)

    def __repr__(self) -> str:
        return f"<SpillBuffer.memory: {len(self)} keys, {self._owner.memory_total} bytes>"


class _DiskView(Mapping):
    """Read-only view of the spilled values; ``view[key]`` reads the file without unspilling."""

    def __init__(self, owner: SpillBuffer):
        self._owner = owner

    def __getitem__(self, key: Hashable) -> Any:
        with self._owner._lock:
            return self._owner._read(key)

    def __contains__(self, key: object) -> bool:
        with self._owner._lock:
            return key in self._owner._slow

    def __iter__(self) -> Iterator[Hashable]:
        with self._owner._lock:
            keys = list(self._owner._slow)
        return iter(keys)

    def __len__(self) -> int:
        return len(self._owner._slow)

    def __repr__(self) -> str:
        return f"<SpillBuffer.disk: {len(self)} keys, {self._owner.disk_total} bytes>"


class SpillBuffer(MutableMapping):
    """Key/value store that keeps recent values in memory and spills the rest to disk.

    Args:
        spill_directory: where spill files go; created (and removed by
            :meth:`close`) if it does not exist.
        target: bytes of in-memory values above which least-recently-used values
            are moved to disk on insert; ``None`` never spills by size (only
            explicit :meth:`evict` calls do).
        max_spill: most bytes the spill files may take; a value that would go
            over it stays in memory.  ``None`` is no limit.
        sizeof: function giving the in-memory size of a value.
        on_no_space: called with the reason when a spill fails for lack of
            space on the disk, and with ``None`` when that is over (see
            :meth:`check_space`); it may be called from any thread that uses
            the buffer, with the buffer's lock held, so it must only hand the
            news on (the worker schedules its pause on its event loop).

    Raises:
        ValueError: ``target`` or ``max_spill`` is negative.
        UnsafePathError: ``spill_directory`` exists but is not ours, is a
            symbolic link, or others can write to it.
        OSError: ``spill_directory`` cannot be created.
    """

    def __init__(
        self,
        spill_directory: str,
        target: int | None,
        max_spill: int | None = None,
        sizeof: Callable[[Any], int] = default_sizeof,
        on_no_space: Callable[[str | None], None] | None = None,
    ):
        if target is not None and target < 0:
            raise ValueError(f"target must be >= 0 or None, got {target!r}")
        if max_spill is not None and max_spill < 0:
            raise ValueError(f"max_spill must be >= 0 or None, got {max_spill!r}")
        self.spill_directory = os.path.abspath(os.fspath(spill_directory))
        self.target = target
        self.max_spill = max_spill
        self._sizeof = sizeof
        self._lock = threading.RLock()
        self._fast: OrderedDict[Hashable, Any] = OrderedDict()
        self._fast_sizes: dict[Hashable, int] = {}
        self._slow: dict[Hashable, tuple[str, int]] = {}  # key -> (file name, file size)
        self._names: set[str] = set()
        self._unpicklable: set[Hashable] = set()
        self._memory_total = 0
        self._disk_total = 0
        #: Bytes written to spill files since the start (never decreases): how much
        #: a computation spilled, after its files are gone.
        self.spilled_bytes_total = 0
        self._warned_no_room = False
        self.on_no_space = on_no_space
        #: Why values stay in memory because the spill disk is full (``None``: it is not).
        self.no_space: str | None = None
        self._no_space_needed = 0  # bytes of the write that failed
        self._no_space_logged = -NO_SPACE_ERROR_INTERVAL
        self._closed = False
        self._created_directory = not os.path.lexists(self.spill_directory)
        os.makedirs(os.path.dirname(self.spill_directory), exist_ok=True)
        self._dir_fd = open_private_directory(self.spill_directory, "spill directory")
        self.memory: Mapping = _MemoryView(self)
        self.disk: Mapping = _DiskView(self)

    # ----------------------------------------------------------------- accounting

    @property
    def memory_total(self) -> int:
        """Bytes held by the in-memory values, as measured by ``sizeof`` on insert."""
        return self._memory_total

    @property
    def disk_total(self) -> int:
        """Bytes taken by the spill files (the sum of their sizes)."""
        return self._disk_total

    @property
    def spilled_count(self) -> int:
        """Number of keys whose values are currently on disk."""
        return len(self._slow)

    # ----------------------------------------------------------------- mapping API

    def __getitem__(self, key: Hashable) -> Any:
        """Return the value of ``key``, reading it back into memory if it was spilled.

        Raises:
            KeyError: ``key`` is not stored.
            OSError: the spill file could not be read.
            Exception: whatever unpickling the spill file raises; the value stays on disk.
        """
        with self._lock:
            value = self._fast.get(key, _missing)
            if value is not _missing:
                self._fast.move_to_end(key)
                return value
            if key not in self._slow:
                raise KeyError(key)
            value = self._read(key)
            size = self._measure(value)
            if self.target is not None and size > self.target:
                return value  # would be spilled straight back: leave it on disk
            self._remove_file(key)
            self._add_to_memory(key, value, size)
            self._evict_to_target(protect=key)
            return value

    def __setitem__(self, key: Hashable, value: Any) -> None:
        """Store ``value`` under ``key``, spilling older values if memory goes over target.

        Raises:
            ValueError: the buffer is closed.
        """
        with self._lock:
            if self._closed:
                raise ValueError("SpillBuffer is closed")
            self._discard(key)
            size = self._measure(value)
            if self.target is not None and size > self.target:
                if self._spill(key, value) == _SPILLED:
                    return
            self._add_to_memory(key, value, size)
            self._evict_to_target(protect=None)

    def __delitem__(self, key: Hashable) -> None:
        """Forget ``key``, deleting its spill file if it has one.

        Raises:
            KeyError: ``key`` is not stored.
        """
        with self._lock:
            if key not in self._fast and key not in self._slow:
                raise KeyError(key)
            self._discard(key)

    def __contains__(self, key: object) -> bool:
        with self._lock:
            return key in self._fast or key in self._slow

    def __len__(self) -> int:
        with self._lock:
            return len(self._fast) + len(self._slow)

    def __iter__(self) -> Iterator[Hashable]:
        with self._lock:
            keys = [*self._fast, *self._slow]
        return iter(keys)

    def pop(self, key: Hashable, default: Any = _missing) -> Any:
        """Remove ``key`` and return its value, without moving other values around.

        Raises:
            KeyError: ``key`` is not stored and no default was given.
            OSError: the spill file could not be read.
        """
        with self._lock:
            if key in self._fast:
                value = self._fast[key]
            elif key in self._slow:
                value = self._read(key)
            elif default is _missing:
                raise KeyError(key)
            else:
                return default
            self._discard(key)
            return value

    def clear(self) -> None:
        """Drop every value and delete every spill file."""
        with self._lock:
            for key in list(self._slow):
                self._remove_file(key)
            self._fast.clear()
            self._fast_sizes.clear()
            self._unpicklable.clear()
            self._memory_total = 0

    # ----------------------------------------------------------------- spilling

    def evict(self) -> int:
        """Move the least recently used spillable value to disk.

        Values that would not pickle are skipped.  Stops at the first value for
        which there is no room on disk (``max_spill`` or a failed write).

        Returns:
            The bytes freed in memory (the value's ``sizeof``), or ``-1`` when
            nothing could be evicted.
        """
        with self._lock:
            if self.no_space is not None:  # the disk is full: check_space retries
                return -1
            return self._evict_one(protect=None)

    def _evict_one(self, protect: Hashable | None) -> int:
        for key in self._fast:
            if key in self._unpicklable or (protect is not None and key == protect):
                continue
            outcome = self._spill(key, self._fast[key])
            if outcome == _SPILLED:
                freed = self._fast_sizes.pop(key)
                del self._fast[key]
                self._memory_total -= freed
                return freed
            if outcome == _NO_ROOM:
                return -1
            # _UNPICKLABLE: marked by _spill, try the next one.
        return -1

    def _evict_to_target(self, protect: Hashable | None, retry: bool = False) -> None:
        if self.target is None or (self.no_space is not None and not retry):
            return  # while the disk is full, only check_space tries again
        while self._memory_total > self.target:
            if self._evict_one(protect) < 0:
                return

    def _spill(self, key: Hashable, value: Any) -> str:
        """Write ``value`` to the file of ``key``; the caller updates the memory tier."""
        try:
            frames = dumps(box_large(value))
        except Exception as e:
            self._unpicklable.add(key)
            logger.warning(
                "Keeping %r in memory: its value (%s) cannot be pickled: %s",
                key, type(value).__name__, e,
            )
            return _UNPICKLABLE
        lengths = [nbytes(f) for f in frames]
        offsets, size = _layout(lengths)
        if self.max_spill is not None and self._disk_total + size > self.max_spill:
            self._warn_no_room(
                "Keeping %r in memory: spilling %d bytes would exceed max_spill=%d "
                "(%d bytes already on disk)",
                key, size, self.max_spill, self._disk_total,
            )
            return _NO_ROOM
        name = self._file_name(key)
        path = os.path.join(self.spill_directory, name)
        fd = -1
        try:
            try:
                fd = create_private_file(name, self._dir_fd)
            except FileExistsError:  # a leftover in our own directory: never reuse it
                os.unlink(name, dir_fd=self._dir_fd)
                fd = create_private_file(name, self._dir_fd)
            header = _HEAD.pack(_MAGIC, len(frames)) + struct.pack(f"<{len(lengths)}Q", *lengths)
            _write_all(fd, header)
            pos = len(header)
            for frame, offset, length in zip(frames, offsets, lengths, strict=True):
                if offset > pos:
                    _write_all(fd, bytes(offset - pos))
                _write_all(fd, frame)
                pos = offset + length
        except OSError as e:
            if fd >= 0:
                try:
                    os.unlink(name, dir_fd=self._dir_fd)
                except OSError:
                    pass
            if e.errno in _NO_SPACE_ERRNOS:
                self._out_of_space(key, path, size, e)
            else:
                self._warn_no_room("Keeping %r in memory: could not write %s: %s", key, path, e)
            return _NO_ROOM
        finally:
            if fd >= 0:
                os.close(fd)
        self._names.add(name)
        self._slow[key] = (name, size)
        self._disk_total += size
        self.spilled_bytes_total += size
        self._unpicklable.discard(key)
        logger.debug("Spilled %r to disk (%d bytes)", key, size)
        if self.no_space is not None:
            self._room_again(f"a spill to {path} succeeded")
        return _SPILLED

    def _out_of_space(self, key: Hashable, path: str, size: int, error: OSError) -> None:
        """A write failed for lack of space: log it (ERROR) and tell ``on_no_space``."""
        self._no_space_needed = size
        if self.no_space is not None:
            logger.debug("Keeping %r in memory: still no space for %s", key, path)
            return
        self.no_space = (f"spilling to {path} failed: {error.strerror or error} (the spill "
                         f"directory's file system is full); results stay in memory")
        now = time.monotonic()
        level = logging.ERROR if now - self._no_space_logged >= NO_SPACE_ERROR_INTERVAL \
            else logging.WARNING
        self._no_space_logged = now
        logger.log(level, "Cannot spill %r (%d bytes): %s. Free space there, or give the "
                   "worker another local_directory.", key, size, self.no_space)
        if self.on_no_space is not None:
            self.on_no_space(self.no_space)

    def _room_again(self, why: str) -> None:
        logger.info("Spilling to %s works again: %s", self.spill_directory, why)
        self.no_space = None
        if self.on_no_space is not None:
            self.on_no_space(None)

    def check_space(self) -> str | None:
        """End a full-disk episode if it is over; return the reason if it is not.

        It is over when nothing needs spilling any more (the values in memory
        fit in ``target``), or when the file system has room for the write
        that failed and spilling down to ``target`` now succeeds.  Cheap while
        the disk stays full: one ``fstatvfs``.
        """
        with self._lock:
            if self.no_space is None or self._closed:
                return self.no_space
            if self.target is None or self._memory_total <= self.target:
                self._room_again("nothing needs spilling now")
                return None
            try:
                st = os.fstatvfs(self._dir_fd)
                free = st.f_bavail * st.f_frsize
            except OSError:  # pragma: no cover - then just try
                free = self._no_space_needed
            if free >= self._no_space_needed:
                self._evict_to_target(protect=None, retry=True)  # a success ends the episode
            return self.no_space

    def _warn_no_room(self, msg: str, *args: Any) -> None:
        level = logging.DEBUG if self._warned_no_room else logging.WARNING
        self._warned_no_room = True
        logger.log(level, msg, *args)

    def _read(self, key: Hashable) -> Any:
        """Load the spilled value of ``key`` (which stays on disk).

        Raises:
            KeyError: ``key`` is not on disk.
            OSError: the file could not be read or is truncated.
        """
        name, size = self._slow[key]
        path = os.path.join(self.spill_directory, name)
        buf = bytearray(size)
        view = memoryview(buf)
        fd = os.open(name, os.O_RDONLY | O_NOFOLLOW | O_CLOEXEC, dir_fd=self._dir_fd)
        with open(fd, "rb", buffering=0) as f:
            pos = 0
            while pos < size:
                n = f.readinto(view[pos:])
                if not n:
                    raise OSError(f"spill file {path} of {key!r} is truncated at {pos}/{size} bytes")
                pos += n
        magic, count = _HEAD.unpack_from(buf, 0)
        if magic != _MAGIC:
            raise OSError(f"spill file {path} of {key!r} has a bad header")
        lengths = list(struct.unpack_from(f"<{count}Q", buf, _HEAD.size))
        offsets, _ = _layout(lengths)
        frames = [view[o : o + n] for o, n in zip(offsets, lengths, strict=True)]
        return loads(frames)

    # ----------------------------------------------------------------- bookkeeping

    def _measure(self, value: Any) -> int:
        try:
            return max(0, int(self._sizeof(value)))
        except Exception:  # a sizeof that fails must not lose the value
            logger.debug("sizeof failed on a %s; counting 64 bytes", type(value).__name__, exc_info=True)
            return 64

    def _add_to_memory(self, key: Hashable, value: Any, size: int) -> None:
        self._fast[key] = value
        self._fast_sizes[key] = size
        self._memory_total += size

    def _discard(self, key: Hashable) -> None:
        """Remove ``key`` from whichever tier holds it (no error if absent)."""
        if key in self._fast:
            del self._fast[key]
            self._memory_total -= self._fast_sizes.pop(key)
        if key in self._slow:
            self._remove_file(key)
        self._unpicklable.discard(key)

    def _remove_file(self, key: Hashable) -> None:
        name, size = self._slow.pop(key)
        self._names.discard(name)
        self._disk_total -= size
        try:
            os.unlink(name, dir_fd=self._dir_fd)
        except FileNotFoundError:
            logger.warning("Spill file of %r was already gone", key)
        except OSError as e:
            logger.warning("Could not delete spill file of %r: %s", key, e)

    def _file_name(self, key: Hashable) -> str:
        """A file name for ``key`` no other stored key uses (hash of type and repr)."""
        try:
            text = f"{type(key).__module__}.{type(key).__qualname__}:{key!r}"
        except Exception:
            text = f"{type(key).__qualname__}@{id(key):x}"
        digest = hashlib.sha1(text.encode("utf-8", "surrogatepass"), usedforsecurity=False)
        base = digest.hexdigest()
        name, n = base + ".spill", 0
        while name in self._names:  # two keys with the same repr
            n += 1
            name = f"{base}-{n}.spill"
        return name

    # ----------------------------------------------------------------- lifetime

    def close(self) -> None:
        """Drop every value, delete every spill file, and the directory if we created it.

        Idempotent.  The buffer cannot store values afterwards.
        """
        with self._lock:
            if self._closed:
                return
            self.clear()
            self._closed = True
            os.close(self._dir_fd)
            if self._created_directory:
                try:
                    os.rmdir(self.spill_directory)
                except OSError as e:
                    logger.warning("Could not remove spill directory %s: %s", self.spill_directory, e)

    def __enter__(self) -> SpillBuffer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"<SpillBuffer {self.spill_directory!r}: {len(self._fast)} in memory "
            f"({self._memory_total} bytes), {len(self._slow)} on disk ({self._disk_total} bytes)>"
        )


__all__ = ["SpillBuffer"]

