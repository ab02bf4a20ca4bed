"""Where the service keeps its shared state: one backend object, four parts.

- ``state(schema, namespace)``: the per-key residual store of the online learner
  (:class:`~streamml.stores.Store`); ``namespace`` is the head's fingerprint, so a
  residual is only ever read back against the head it was learned on.
- ``events``: the event log (rank records, first-reward claims, client event ids).
- ``catalog``: the item catalog (each query's item ids, texts and embeddings).
- ``control``: one small record saying which model every worker should serve, so a
  reload or rollback asked of one worker reaches the others.

Every worker process opens the same backend; all cross-process consistency (atomic
per-key updates, claims that succeed once) is the backend's. ``errors`` lists the
exceptions that mean "the backend is unavailable" (answered with 503).

Backends: :class:`MemoryBackend` (one process, tests), :class:`SQLiteBackend` (the
embedded default: one WAL file), :class:`RedisBackend` (``redis.Redis`` or Redis Cluster).
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from pathlib import Path

import numpy as np

from streamml.stores import InMemoryStore, Schema, Store

__all__ = ["MemoryBackend", "MemoryCatalog", "MemoryEventLog", "SQLiteBackend", "RedisBackend", "read_folder"]


def read_folder(path: str | Path, embedding_dim: int = 384) -> list[tuple[str, list[str], np.ndarray]]:
    """``[(query, texts, X)]`` of a folder of query files (validated, duplicates merged)."""
    from streamml.data import load_queries

    data = load_queries(path, embedding_dim, min_per_class=0)
    out = []
    for q, query in enumerate(data.query_ids):
        rows = np.flatnonzero(data.query == q)
        out.append((query, data.frame["text"].iloc[rows].tolist(), data.X[rows]))
    return out


# ---------------------------------------------------------------- claims
# ``claim`` is ("event", event_id, item, None) for a reward, ("client", client_event_id, None, ttl_s)
# for plain feedback. ``claim_and_apply(claim, apply)`` runs ``apply`` (the learner's update)
# only if the claim is won, and returns whether it was. SQLite and Redis write the claim in the
# transaction of the update (the store's ``update_many`` takes the thread's pending claim), so a
# process killed between the two cannot leave a claim without its update.


def _claim_then_apply(events, claim: tuple, apply) -> bool:
    """The memory backend's two steps: the claim, then the update; a failed update releases
    its claim (a killed process takes both with it)."""
    kind, ident, item, ttl_s = claim
    won = events.claim(ident, item) if kind == "event" else events.claim_client_event(ident, ttl_s)
    if not won:
        return False
    try:
        apply()
    except BaseException:
        try:
            events.release(ident, item) if kind == "event" else events.release_client_event(ident)
        except Exception:  # the backend is still away: the claim stays (see above)
            pass
        raise
    return True


class _AlreadyClaimed(Exception):
    pass


_PENDING = threading.local()  # the claim the next store update on this thread must win, inside its transaction


def _apply_claimed(pending, apply) -> bool:
    """Run ``apply`` with ``pending`` as the thread's pending claim; False if it was already won."""
    _PENDING.claim = pending
    try:
        apply()
        if _PENDING.claim is not None:  # the learner wrote without update_many: the claim was never made
            raise RuntimeError("the online learner's update did not go through the store's update_many")
    except _AlreadyClaimed:
        return False
    finally:
        _PENDING.claim = None
    return True


def _sqlite_claim(conn, now: float, kind: str, ident: str, item, ttl_s) -> bool:
    """The SQLite event log's claim (tables of :class:`~streamml.stores.SQLiteEventLog`) on ``conn``."""
    from streamml.stores.codec import encode_key

    if kind == "event":
        row = conn.execute("SELECT expires FROM events WHERE event_id = ?", (ident,)).fetchone()
        if row is None or row[0] <= now:
            raise KeyError(f"unknown or expired event {ident!r}")
        return conn.execute("INSERT OR IGNORE INTO claims(event_id, item) VALUES (?, ?)",
                            (ident, encode_key(item, "claim item"))).rowcount == 1
    return conn.execute(
        "INSERT INTO client_events(id, expires) VALUES (?, ?) "
        "ON CONFLICT(id) DO UPDATE SET expires = excluded.expires WHERE client_events.expires <= ?",
        (str(ident), now + ttl_s, now),
    ).rowcount == 1


def _sqlite_claiming_store():
    from streamml.stores import SQLiteStore

    class ClaimingSQLiteStore(SQLiteStore):
        """A SQLiteStore whose ``update_many`` first wins the thread's pending claim, in the
        same transaction: the claim and the state update commit together or not at all."""

        def update_many(self, keys, fn):
            claim = getattr(_PENDING, "claim", None)
            if claim is None:
                return super().update_many(keys, fn)
            _PENDING.claim = None  # one claim, one update

            def claimed(state):
                if not claim(self.db.conn):
                    raise _AlreadyClaimed
                return fn(state)

            return super().update_many(keys, claimed)

    return ClaimingSQLiteStore


def _redis_claiming_store():
    from streamml.stores.redis import RedisStore

    class ClaimingRedisStore(RedisStore):
        """A RedisStore whose ``update_many`` writes the thread's pending claim in the same
        MULTI/EXEC or script (:meth:`~streamml.stores.redis.RedisStore.update_claimed`)."""

        def update_many(self, keys, fn):
            claim = getattr(_PENDING, "claim", None)
            if claim is None:
                return super().update_many(keys, fn)
            _PENDING.claim = None  # one claim, one update
            if not self.update_claimed(keys, fn, claim):
                raise _AlreadyClaimed

    return ClaimingRedisStore


class MemoryEventLog:
    """The event log in a dict (one process)."""

    def __init__(self):
        self._lock = threading.Lock()
        self._events: dict[str, tuple[dict, float]] = {}
        self._claims: set[tuple[str, int]] = set()
        self._client: dict[str, float] = {}

    def create(self, event_id: str, record: dict, ttl_s: float) -> None:
        with self._lock:
            self._events[event_id] = (record, time.time() + ttl_s)

    def get(self, event_id: str) -> dict | None:
        hit = self._events.get(event_id)
        return hit[0] if hit and hit[1] > time.time() else None

    def claim(self, event_id: str, item_id: int) -> bool:
        with self._lock:
            key = (event_id, int(item_id))
            if key in self._claims:
                return False
            self._claims.add(key)
            return True

    def release(self, event_id: str, item_id: int) -> None:
        with self._lock:
            self._claims.discard((event_id, int(item_id)))

    def claim_client_event(self, client_event_id: str, ttl_s: float) -> bool:
        with self._lock:
            now = time.time()
            if self._client.get(client_event_id, 0.0) > now:
                return False
            self._client[client_event_id] = now + ttl_s
            return True

    def release_client_event(self, client_event_id: str) -> None:
        with self._lock:
            self._client.pop(client_event_id, None)


class MemoryCatalog:
    """The item catalog in memory: global item ids in load order."""

    def __init__(self):
        self._queries: dict[str, tuple[np.ndarray, list[str], np.ndarray]] = {}
        self._next = 0

    def load_folder(self, path: str | Path, embedding_dim: int = 384) -> int:
        n = 0
        for query, texts, X in read_folder(path, embedding_dim):
            ids = np.arange(self._next, self._next + len(texts))
            self._next += len(texts)
            self._queries[query] = (ids, texts, X.astype(np.float32))
            n += len(texts)
        return n

    def queries(self) -> list[str]:
        return sorted(self._queries)

    def items(self, query: str):
        return self._queries[query]


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
        self._stores: dict[str, Store] = {}

    def claim_and_apply(self, claim: tuple, apply) -> bool:
        return _claim_then_apply(self.events, claim, apply)

    def state(self, schema: Schema, namespace: str) -> Store:
        if namespace not in self._stores:
            self._stores[namespace] = InMemoryStore(schema)
        return self._stores[namespace]

    def ping(self) -> None:
        pass

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
    many seconds, so no request waits for a 16 MB copy and fsync (:mod:`streamml.stores.sqlite`).
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
        self.control = SQLiteControl(self.db)
        self.errors = (StoreUnavailable, sqlite3.OperationalError)

    def state(self, schema: Schema, namespace: str) -> Store:
        from streamml.stores import SQLiteStore

        store = _sqlite_claiming_store()(schema, self.db, table=f"state_{namespace}")
        store.bind_head(namespace, on_mismatch="error")
        return store

    def claim_and_apply(self, claim: tuple, apply) -> bool:
        """Claim and update in one SQLite transaction: a killed process leaves both or neither."""
        return _apply_claimed(lambda conn: _sqlite_claim(conn, self.events.clock(), *claim), apply)

    def ping(self) -> None:
        self.db.conn.execute("SELECT 1").fetchone()

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
        from streamml.stores.redis import _guard

        with _guard("control get"):
            raw = self._client.get(self._key)
        return json.loads(raw) if raw else None

    def set(self, value: dict) -> None:
        from streamml.stores.redis import _guard

        with _guard("control set"):
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
        self.errors = (StoreUnavailable,)

    def state(self, schema: Schema, namespace: str) -> Store:
        store = _redis_claiming_store()(schema, self.client, prefix=f"{self.prefix}:s{namespace}")
        store.bind_head(namespace, on_mismatch="error")
        return store

    def claim_and_apply(self, claim: tuple, apply) -> bool:
        """Claim and update in one MULTI/EXEC (one script in a cluster): the claim's key carries the
        user's hash tag, so it shares the slot of the user's state. A killed process leaves both or
        neither. A client event id is therefore first-wins per user here."""
        from streamml.stores.redis import _ms

        kind, ident, item, ttl_s = claim
        ttl_ms = self.events.ttl_ms(ident) if kind == "event" else _ms(ttl_s)
        return _apply_claimed(lambda tag: (self.events.claim_key(kind, ident, item, tag), ttl_ms), apply)

    def ping(self) -> None:
        from streamml.stores.redis import _guard

        with _guard("ping"):
            self.client.ping()

    def close(self) -> None:
        self.client.close()
