"""Where the service keeps its shared state: one backend object, four parts.

- ``state(schema, namespace)``: the per-key residual store of the online learner
  (:class:`~streamml.stores.Store`); ``namespace`` is the head's fingerprint, so a
  residual is only ever read back against the head it was learned on.
- ``events``: the event log (rank records, first-reward claims, client event ids).
- ``catalog``: the item catalog (each query's item ids, texts and embeddings).
- ``control``: one small record saying which model every worker should serve, so a
  reload or rollback asked of one worker reaches the others.
- ``blobs``: named byte strings written once (first writer wins), such as the mixed
  learner's population fit stored with its head (:mod:`streamml.serve.population`), so every
  worker on every host serves the same one.

Every worker process opens the same backend; all cross-process consistency (atomic
per-key updates, claims that succeed once) is the backend's: ``claim_and_apply(claim, update)``
wins a :class:`~streamml.stores.events.Claim` and runs its :class:`Update` in one transaction.
``health()`` says whether requests can reach the store (``/readyz``), and ``errors`` lists the
exceptions that mean "the backend is unavailable" (answered with 503). :class:`Backend` is the
Protocol, checked in ``tests/serve/test_backend.py``.

Backends: :class:`MemoryBackend` (one process, tests), :class:`SQLiteBackend` (the
embedded default: one WAL file), :class:`RedisBackend` (``redis.Redis`` or Redis Cluster).
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

from streamml.stores import InMemoryStore, Schema, Store
from streamml.stores.events import Catalog, Claim, EventLog, MemoryCatalog, MemoryEventLog

__all__ = ["Backend", "Blobs", "Update", "MemoryBackend", "MemoryCatalog", "MemoryEventLog", "SQLiteBackend", "RedisBackend"]


@dataclass(frozen=True)
class Update:
    """One read-modify-write of a store, not yet run: ``store.update_many(keys, fn)``. The
    service gets it from the online learner (:func:`streamml.serve.events.learner_update`) and
    hands it, with the :class:`~streamml.stores.events.Claim` that guards it, to
    ``backend.claim_and_apply``: SQLite and Redis then win the claim and write the update in
    one transaction (``store.update_claimed``), so a process killed in between leaves both or neither."""

    store: Store
    keys: list
    fn: Callable[[dict[str, np.ndarray]], Mapping[str, np.ndarray]]


class Blobs(Protocol):
    """Named byte strings, each written once: ``put_once`` keeps the first value stored under
    ``name`` and returns what is stored (so workers racing to write agree on one value)."""

    def get(self, name: str) -> bytes | None: ...
    def put_once(self, name: str, value: bytes) -> bytes: ...


class MemoryBlobs:
    def __init__(self):
        self._values: dict[str, bytes] = {}

    def get(self, name: str) -> bytes | None:
        return self._values.get(name)

    def put_once(self, name: str, value: bytes) -> bytes:
        return self._values.setdefault(name, bytes(value))


class SQLiteBlobs:
    """Blobs in the ``blobs`` table of the backend's SQLite file."""

    def __init__(self, db):
        self.db = db  # the table is made by the first put_once: opening the backend takes no write lock

    def get(self, name: str) -> bytes | None:
        conn = self.db.conn
        if conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'blobs'").fetchone() is None:
            return None
        row = conn.execute("SELECT value FROM blobs WHERE name = ?", (name,)).fetchone()
        return None if row is None else bytes(row[0])

    def put_once(self, name: str, value: bytes) -> bytes:
        with self.db.transaction() as conn:
            conn.execute("CREATE TABLE IF NOT EXISTS blobs (name TEXT PRIMARY KEY, value BLOB NOT NULL)")
            conn.execute("INSERT OR IGNORE INTO blobs(name, value) VALUES (?, ?)", (name, sqlite3.Binary(value)))
            return bytes(conn.execute("SELECT value FROM blobs WHERE name = ?", (name,)).fetchone()[0])


class RedisBlobs:
    """Blobs as Redis strings ``<prefix>:blob:<name>`` (``SET NX``: the first writer wins)."""

    def __init__(self, client, prefix: str):
        self._client, self._prefix = client, prefix

    def get(self, name: str) -> bytes | None:
        from streamml.stores.redis_conn import guard

        with guard("blob get"):
            return self._client.get(f"{self._prefix}:blob:{name}")

    def put_once(self, name: str, value: bytes) -> bytes:
        from streamml.stores.redis_conn import guard

        with guard("blob put"):
            self._client.set(f"{self._prefix}:blob:{name}", value, nx=True)
            return self._client.get(f"{self._prefix}:blob:{name}")


@runtime_checkable
class Backend(Protocol):
    """What the service needs from where it keeps its state (see the module docstring)."""

    events: EventLog
    catalog: Catalog
    blobs: Blobs
    errors: tuple[type[BaseException], ...]

    def state(self, schema: Schema, namespace: str) -> Store: ...
    def claim_and_apply(self, claim: Claim, update: Update) -> bool: ...
    def health(self) -> dict: ...
    def close(self) -> None: ...


class MemoryControl:
    def __init__(self):
        self._value: dict | None = None

    def get(self) -> dict | None:
        return self._value

    def set(self, value: dict) -> None:
        self._value = dict(value)


class MemoryBackend:
    """Everything in this process: for tests and single-process experiments."""

    errors: tuple[type[BaseException], ...] = ()

    def __init__(self):
        self.events, self.catalog, self.control = MemoryEventLog(), MemoryCatalog(), MemoryControl()
        self.blobs = MemoryBlobs()
        self._stores: dict[str, Store] = {}

    def claim_and_apply(self, claim: Claim, update: Update) -> bool:
        """The claim, then the update; a failed update releases its claim (a killed
        process takes both with it: there is nothing durable here)."""
        if not self.events.claim_of(claim):
            return False
        try:
            update.store.update_many(update.keys, update.fn)
        except BaseException:
            self.events.release_of(claim)
            raise
        return True

    def state(self, schema: Schema, namespace: str) -> Store:
        if namespace not in self._stores:
            self._stores[namespace] = InMemoryStore(schema)
        return self._stores[namespace]

    def health(self) -> dict:
        return {"status": "ready"}

    def close(self) -> None:
        pass


class SQLiteBackend:
    """The embedded default: items, per-user state, event log and control record in one
    SQLite file in WAL mode (:mod:`streamml.stores.sqlite`), shared by every worker.

    Each head's residuals live in their own table ``state_<fingerprint>``, bound to that
    head (:meth:`~streamml.stores.SQLiteStore.bind_head`): a new head starts from fresh
    residuals, and a rollback finds the old head's residuals where it left them.

    With ``checkpoint_interval_s > 0`` (default) no request checkpoints the WAL: a
    :class:`~streamml.stores.sqlite.Checkpointer` thread of each worker does, every that
    many seconds, so no request waits for the WAL's copy and fsync (:mod:`streamml.stores.sqlite`).
    0 leaves checkpoints to SQLite, inside the commit that fills 1000 pages of WAL.
    """

    def __init__(self, path: str | Path = "streamml.db", synchronous: str = "NORMAL", busy_timeout_s: float = 10.0,
                 checkpoint_interval_s: float = 0.1):
        from streamml.stores import Checkpointer, SQLiteDB, SQLiteEventLog, SQLiteItems, StoreUnavailable

        if checkpoint_interval_s < 0:
            raise ValueError(f"checkpoint_interval_s must be >= 0, got {checkpoint_interval_s}")
        background = checkpoint_interval_s > 0
        self.db = SQLiteDB(path, synchronous=synchronous, busy_timeout_s=busy_timeout_s,
                           autocheckpoint=0 if background else 1000)
        self._checkpointer = Checkpointer(self.db, checkpoint_interval_s) if background else None
        self.events, self.catalog = SQLiteEventLog(self.db), SQLiteItems(self.db)
        self.control, self.blobs = SQLiteControl(self.db), SQLiteBlobs(self.db)
        self.errors = (StoreUnavailable, sqlite3.OperationalError)

    def state(self, schema: Schema, namespace: str) -> Store:
        from streamml.stores import SQLiteStore

        store = SQLiteStore(schema, self.db, table=f"state_{namespace}")
        store.bind_head(namespace, on_mismatch="error")
        return store

    def claim_and_apply(self, claim: Claim, update: Update) -> bool:
        """Claim and update in one SQLite transaction: a killed process leaves both or neither."""
        return update.store.update_claimed(update.keys, update.fn, claim, self.events)

    def health(self) -> dict:
        """Ready if the file answers a read and its write lock can be had within a second (or
        the busy timeout if shorter): every rank and reward writes, so a lock held longer means
        they queue or fail. Every worker of the host shares the file: draining the host is right."""
        self.db.conn.execute("SELECT 1 FROM meta LIMIT 1").fetchall()
        self.db.probe_write(1.0)
        return {"status": "ready"}

    def close(self) -> None:
        if self._checkpointer is not None:
            self._checkpointer.stop()
            self._checkpointer = None


class SQLiteControl:
    """The control record in the ``meta`` table of the backend's SQLite file."""

    def __init__(self, db):
        self.db = db

    def get(self) -> dict | None:
        value = self.db.meta_get(self.db.conn, "serve.model")
        return json.loads(value) if value else None

    def set(self, value: dict) -> None:
        with self.db.transaction() as conn:
            self.db.meta_set(conn, "serve.model", json.dumps(value))


class RedisControl:
    def __init__(self, client, key: str):
        self._client, self._key = client, key

    def get(self) -> dict | None:
        from streamml.stores.redis_conn import guard

        with guard("control get"):
            raw = self._client.get(self._key)
        return json.loads(raw) if raw else None

    def set(self, value: dict) -> None:
        from streamml.stores.redis_conn import guard

        with guard("control set"):
            self._client.set(self._key, json.dumps(value))


class RedisBackend:
    """Per-user state, the event log, the item catalog and the control record in Redis
    (:mod:`streamml.stores.redis`), shared by every worker on every host.

    Parameters
    ----------
    url
        ``redis://host:port/db``; with ``cluster=True`` the URL of any node of a Redis Cluster.
    prefix
        Namespace of every key. Each head's residuals live under ``<prefix>:s<fingerprint>``.
    timeout_s
        Socket timeouts; there are no automatic retries, so a request fails fast (503)
        when Redis is down, and the client reconnects by itself once it is back.
    """

    def __init__(self, url: str = "redis://127.0.0.1:6379/0", cluster: bool = False, prefix: str = "streamml",
                 timeout_s: float = 0.5):
        from streamml.stores import StoreUnavailable
        from streamml.stores.redis import RedisEventLog, RedisItems, connect

        if cluster and url.startswith("redis://"):
            url = "redis-cluster://" + url[len("redis://"):]
        self.client = connect(url, timeout_s)
        self.prefix = prefix.rstrip(":")
        self.events, self.catalog = RedisEventLog(self.client, self.prefix), RedisItems(self.client, self.prefix)
        self.control = RedisControl(self.client, f"{self.prefix}:control")
        self.blobs = RedisBlobs(self.client, self.prefix)
        self.errors = (StoreUnavailable,)

    def state(self, schema: Schema, namespace: str) -> Store:
        from streamml.stores.redis import RedisStore

        store = RedisStore(schema, self.client, prefix=f"{self.prefix}:s{namespace}")
        store.bind_head(namespace, on_mismatch="error")
        return store

    def claim_and_apply(self, claim: Claim, update: Update) -> bool:
        """Claim and update in one MULTI/EXEC (one script in a cluster): the claim's key carries the
        user's hash tag, so it shares the slot of the user's state. A killed process leaves both or
        neither."""
        return update.store.update_claimed(update.keys, update.fn, claim, self.events)

    def health(self) -> dict:
        """Every primary of a cluster, not only redis-py's default node (:func:`streamml.stores.redis.health`)."""
        from streamml.stores.redis import health

        return health(self.client)

    def close(self) -> None:
        self.client.close()
