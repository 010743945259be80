"""Published datasets: named values (persisted collections, futures, anything that
pickles) that outlive the client that published them, for other clients to get.

Theory of operation
-------------------
:class:`PublishExtension` is the scheduler's part (``scheduler.extensions["publish"]``):
``{name: record}`` (see :mod:`cluster.runtime.extensions.holding`).  The futures of a
published dataset (those of a persisted dask collection, a future, or futures
nested in a value) stay in memory while it is published, held under the
pseudo-client ``"published-<name>"``, whoever published it and whether or not
that client is still connected.  Publishing a name that exists raises
``KeyError`` unless ``override=True``; several datasets published in one call
are checked first and stored together, or none is.

:class:`Datasets` is the client's part (``client.datasets``): the methods
``publish_dataset``, ``get_dataset``, ``list_datasets`` and
``unpublish_dataset`` (the client exposes them under the same names) and the
mapping dask.distributed's ``client.datasets`` is (``client.datasets["x"] =
df``, ``del``, ``in``, ``len``, iteration).
"""

from __future__ import annotations

from collections.abc import Hashable, Iterator, MutableMapping
from typing import TYPE_CHECKING, Any

from . import holding

if TYPE_CHECKING:  # pragma: no cover
    from ..client import Client
    from ..scheduler.server import Scheduler

#: ``get_dataset(name)`` without a default raises ``KeyError`` for a name not published.
NO_DEFAULT = object()


class PublishExtension:
    """The scheduler's published datasets: ``publish_put``, ``publish_get``,
    ``publish_list``, ``publish_delete``.

    Args:
        scheduler: the scheduler this is a part of.
    """

    def __init__(self, scheduler: Scheduler):
        self.scheduler = scheduler
        #: ``{name: record}`` of every published dataset.
        self.datasets: dict[Hashable, dict] = {}
        self.handlers = {
            "publish_put": self.put,
            "publish_get": self.get,
            "publish_list": self.list,
            "publish_delete": self.delete,
        }

    @staticmethod
    def holder(name: Hashable) -> str:
        """The pseudo-client that keeps the futures of dataset ``name`` alive."""
        return f"published-{name}"

    async def put(self, datasets: dict, override: bool = False, client: str | None = None) -> list:
        """Publish ``{name: record}``, all or none.

        Raises:
            KeyError: a name is published already and ``override`` is false.
            TypeError: a record is not a value record.
            ClusterTimeoutError: a future in a dataset is unknown to the scheduler.
        """
        if not isinstance(datasets, dict):
            raise TypeError(f"datasets={datasets!r:.80}: expected {{name: record}}")
        for name, record in datasets.items():
            holding.check_record(record)
            if name in self.datasets and not override:
                raise KeyError(f"Dataset {name} already exists")
        keys = [k for record in datasets.values() for k in holding.record_keys(record)]
        await holding.require_known(self.scheduler, keys, f"datasets {sorted(map(str, datasets))}")
        for name in datasets:
            if name in self.datasets and not override:  # published while we waited
                raise KeyError(f"Dataset {name} already exists")
        for name, record in datasets.items():
            new = holding.record_keys(record)
            holding.hold(self.scheduler, self.holder(name), new)
            old = self.datasets.get(name)
            self.datasets[name] = record
            kept = set(new)
            holding.release(self.scheduler, self.holder(name),
                            [k for k in holding.record_keys(old) if k not in kept])
        return list(datasets)

    def get(self, name: Hashable, client: str | None = None) -> dict | None:
        """The record of ``name`` (``None`` if not published); its futures are handed to ``client``."""
        record = self.datasets.get(name)
        if record is not None:
            holding.hand_over(self.scheduler, client, holding.record_keys(record))
        return record

    def list(self, client: str | None = None) -> list:
        """The published names, sorted (as strings)."""
        return sorted(self.datasets, key=str)

    def delete(self, name: Hashable, client: str | None = None) -> None:
        """Unpublish ``name`` and let go of its futures (nothing happens if it is not published)."""
        old = self.datasets.pop(name, None)
        holding.release(self.scheduler, self.holder(name), holding.record_keys(old))


class Datasets(MutableMapping):
    """A client's published datasets: a part of :class:`~cluster.runtime.client.Client`
    (``client.datasets``), and the mapping dask.distributed's ``client.datasets`` is.

    Args:
        client: the client whose scheduler keeps the datasets.
    """

    def __init__(self, client: Client):
        self.client = client

    # ------------------------------------------------------------------ the client's methods

    def publish_dataset(self, *args, name: Hashable | None = None, override: bool = False, **kwargs):
        """Publish values on the scheduler under names, for other clients to get.

        Their futures (e.g. of a persisted collection) stay in memory while
        published, even after this client closes.

        Args:
            *args: with ``name``: the value (several values are published as one tuple).
            name: the name of the positional value.
            override: replace datasets of the same names instead of raising.
            **kwargs: ``name=value`` pairs to publish.

        Raises:
            KeyError: a name is published already (and ``override`` is false).
            ValueError: ``name`` without a value, or values without ``name``.
        """
        datasets: dict = {}
        if name is not None:
            if not args:
                raise ValueError("publish_dataset(name=...) needs the value: "
                                 "publish_dataset(df, name='ds')")
            datasets[name] = args[0] if len(args) == 1 else args
        elif args:
            raise ValueError("publish_dataset: positional values need a name: publish_dataset(df, "
                             "name='ds') or publish_dataset(ds=df)")
        for k, v in kwargs.items():
            if k in datasets:
                raise ValueError(f"publish_dataset: {k!r} given twice")
            datasets[k] = v
        records = {k: holding.encode(v) for k, v in datasets.items()}
        done = holding.scheduler_call(self.client, "publish_put", keep=datasets, datasets=records,
                                      override=override)
        return done if self.client.asynchronous else None

    def get_dataset(self, name: Hashable, default: Any = NO_DEFAULT, **kwargs):
        """The dataset published as ``name``; its futures belong to this client.

        Raises:
            KeyError: ``name`` is not published and no ``default`` was given.
        """
        if kwargs:
            raise TypeError(f"get_dataset() got unexpected keyword arguments: {', '.join(sorted(kwargs))}")
        client = self.client
        if client.asynchronous:
            return self._get_dataset(name, default)
        return self._decode(name, default, holding.scheduler_call(client, "publish_get", name=name))

    async def _get_dataset(self, name: Hashable, default: Any):
        return self._decode(name, default, await holding.scheduler_call(self.client, "publish_get",
                                                                        name=name))

    def _decode(self, name: Hashable, default: Any, record: dict | None):
        if record is None:
            if default is NO_DEFAULT:
                raise KeyError(f"Dataset '{name}' not found")
            return default
        return holding.decode(self.client, record)

    def list_datasets(self):
        """The names of the published datasets."""
        return holding.scheduler_call(self.client, "publish_list")

    def unpublish_dataset(self, name: Hashable):
        """Remove the dataset ``name`` (nothing happens if it is not published); its futures
        are let go of, and freed unless someone else holds them."""
        return holding.scheduler_call(self.client, "publish_delete", name=name)

    # ------------------------------------------------------------------ the mapping (synchronous clients)

    def __getitem__(self, name: Hashable) -> Any:
        return self.get_dataset(name)

    def __setitem__(self, name: Hashable, value: Any) -> None:
        self.publish_dataset(value, name=name)

    def __delitem__(self, name: Hashable) -> None:
        self.unpublish_dataset(name)

    def __contains__(self, name: object) -> bool:
        return name in self.list_datasets()

    def __iter__(self) -> Iterator:
        return iter(self.list_datasets())

    def __len__(self) -> int:
        return len(self.list_datasets())

    def __repr__(self) -> str:
        return f"<Datasets of {self.client.id}>"
