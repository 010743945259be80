"""Message (de)serialisation: pickle protocol 5 with out-of-band buffers.

A message becomes a list of frames: frame 0 is the pickle stream, the rest are
the raw buffers that protocol 5 took out of band (NumPy arrays, ``PickleBuffer``
and large ``bytes`` wrapped by :func:`box_large`).  Buffers go to the socket as
they are, without being copied into the pickle stream, and on the receiving side
are handed to ``pickle.loads`` straight from the preallocated receive buffer.

Plain ``pickle`` is tried first (fast C pickler); anything it cannot handle
(lambdas, closures, interactively defined functions) is retried with cloudpickle.
"""

from __future__ import annotations

import pickle
from typing import Any

import cloudpickle

from ..errors import TaskSerializationError

#: ``bytes`` payloads at least this big travel out of band (no copy into pickle).
OUT_OF_BAND_THRESHOLD = 64 * 1024


def _bytes_from_buffer(buf) -> bytes:
    return bytes(buf)


class _BytesBox:
    """Wraps a large ``bytes`` so pickle sends it out of band; loads back as ``bytes``."""

    __slots__ = ("value",)

    def __init__(self, value: bytes):
        self.value = value

    def __reduce_ex__(self, protocol):
        if protocol >= 5:
            return _bytes_from_buffer, (pickle.PickleBuffer(self.value),)
        return _bytes_from_buffer, (self.value,)


def box_large(value: Any) -> Any:
    """Return ``value`` wrapped for out-of-band transfer if it is a large bytes-like."""
    if type(value) is bytes and len(value) >= OUT_OF_BAND_THRESHOLD:
        return _BytesBox(value)
    if type(value) is bytearray and len(value) >= OUT_OF_BAND_THRESHOLD:
        return _BytearrayBox(value)
    if type(value) is memoryview and value.nbytes >= OUT_OF_BAND_THRESHOLD and value.contiguous:
        return pickle.PickleBuffer(value)
    return value


def _bytearray_from_buffer(buf) -> bytearray:
    return buf if type(buf) is bytearray else bytearray(buf)


class _BytearrayBox:
    """Like :class:`_BytesBox`, for ``bytearray`` (loads back as a ``bytearray``)."""

    __slots__ = ("value",)

    def __init__(self, value: bytearray):
        self.value = value

    def __reduce_ex__(self, protocol):
        if protocol >= 5:
            return _bytearray_from_buffer, (pickle.PickleBuffer(self.value),)
        return _bytearray_from_buffer, (bytes(self.value),)


def dumps(msg: Any) -> list:
    """Serialise ``msg`` to frames ``[pickle_stream, *buffers]``.

    Raises:
        TaskSerializationError: when neither pickle nor cloudpickle can handle it.
    """
    buffers: list = []
    try:
        head = pickle.dumps(msg, protocol=5, buffer_callback=buffers.append)
    except Exception:
        buffers = []
        try:
            head = cloudpickle.dumps(msg, protocol=5, buffer_callback=buffers.append)
        except Exception as e:
            raise TaskSerializationError(f"message of type {type(msg).__name__}", repr(e)) from e
    if not buffers:
        return [head]
    return [head, *(b.raw() for b in buffers)]


def loads(frames: list) -> Any:
    """Inverse of :func:`dumps`; buffers are used in place (no copy)."""
    return pickle.loads(frames[0], buffers=frames[1:])


def dumps_function(obj: Any) -> bytes:
    """Pickle code (functions, lambdas, closures) and its arguments with cloudpickle.

    Raises:
        TaskSerializationError: naming the object that would not pickle.
    """
    try:
        return cloudpickle.dumps(obj, protocol=5)
    except Exception as e:
        raise TaskSerializationError(_describe(obj), f"{type(e).__name__}: {e}") from e


def _describe(obj: Any) -> str:
    code = getattr(obj, "__code__", None)
    if code is not None and callable(obj):
        return _describe_function(obj, code)
    if isinstance(obj, tuple) and len(obj) == 3 and callable(obj[0]):
        func, args, kwargs = obj
        # Find the culprit so the error names it rather than the whole task.
        for what, part in [("function", func)] + [
            (f"argument {i}", a) for i, a in enumerate(args)
        ] + [(f"keyword argument {k!r}", v) for k, v in (kwargs or {}).items()]:
            try:
                cloudpickle.dumps(part, protocol=5)
            except Exception:
                return f"{what} ({type(part).__name__}: {_short_repr(part)}) of task {getattr(func, '__name__', func)!r}"
    return f"object of type {type(obj).__name__}"


def _describe_function(func: Any, code: Any) -> str:
    """``function <name> (file:line), which refers to <culprit>``: the closure variable,
    default or global that would not pickle, when one of them is to blame."""
    name = getattr(func, "__qualname__", None) or getattr(func, "__name__", "?")
    what = f"function {name} ({code.co_filename}:{code.co_firstlineno})"
    suspects: list[tuple[str, Any]] = []
    for var, cell in zip(code.co_freevars, getattr(func, "__closure__", None) or (), strict=False):
        try:
            suspects.append((f"the variable {var!r} it captures", cell.cell_contents))
        except ValueError:  # an empty cell
            pass
    for i, default in enumerate(getattr(func, "__defaults__", None) or ()):
        suspects.append((f"its default argument {i}", default))
    for var, default in (getattr(func, "__kwdefaults__", None) or {}).items():
        suspects.append((f"its default for {var!r}", default))
    globs = getattr(func, "__globals__", None) or {}
    for var in code.co_names:
        if var in globs:
            suspects.append((f"the global {var!r} it uses", globs[var]))
    for label, value in suspects:
        try:
            cloudpickle.dumps(value, protocol=5)
        except Exception:
            return f"{what}: {label} ({type(value).__name__}: {_short_repr(value)}) cannot be pickled"
    return what


def _short_repr(obj: Any) -> str:
    try:
        r = repr(obj)
    except Exception:
        r = object.__repr__(obj)
    return r if len(r) < 80 else r[:77] + "..."


def nbytes(frame) -> int:
    if isinstance(frame, (bytes, bytearray)):
        return len(frame)
    return memoryview(frame).nbytes
