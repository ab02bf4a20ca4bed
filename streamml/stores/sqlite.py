"""The embedded default: per-user state, the event log and the item catalog in one SQLite file.

One file in WAL mode serves several processes (uvicorn workers) at once: readers
never block the writer, and writers queue on SQLite's single write lock with a
busy timeout instead of failing.

- **State** (:class:`SQLiteStore`): one row per key, ``(key TEXT UNIQUE, value
  BLOB)``, the value being the record's fields packed into one blob
  (:mod:`streamml.stores.codec`). A blob, not a column per field, because the
  schema is the learner's to choose (a rule may add a field): no table migration
  when it changes, one row read per key, and no per-column overhead. The table
  has an integer rowid: new rows append to the end of the table b-tree, so its
  pages stay full, and 16 KiB pages hold ~19 records of ~800 bytes each (with
  4 KiB pages only 4 fit, ~1 KiB per key).
- **Atomicity:** ``update_many`` reads, applies ``fn`` and writes inside one
  ``BEGIN IMMEDIATE`` transaction, which takes the write lock before reading, so
  two processes updating one key serialise and none of N updates is lost.
- **Durability:** ``synchronous=NORMAL`` by default. In WAL mode a commit is then
  written to the WAL file (the OS page cache) before it returns, so it survives
  SIGKILL of the process, which is what the service promises; only an OS crash or
  power cut can lose the last commits. ``synchronous="FULL"`` fsyncs every commit
  to survive those too, at the cost of an fsync per write.
- **Checkpoints:** SQLite copies the WAL back into the database file (a checkpoint,
  with an fsync) once the WAL passes ``autocheckpoint`` pages, inside the commit
  that crossed the mark. With 16 KiB pages a rank and a reward append ~100 KB of WAL,
  so at a few hundred requests per second that is a 16 MB checkpoint every second or
  so, stalling the request that pays for it and those queued behind it. :class:`Checkpointer` runs them
  on a thread instead (``PASSIVE``: it never blocks readers or writers, and sqlite3
  releases the GIL meanwhile); a service sets ``autocheckpoint=0`` on the request
  connections and starts one. Checkpoints do not change durability: a commit is in
  the WAL either way.
- **Write lock:** a writer that finds another worker's transaction open retries
  ``BEGIN IMMEDIATE`` every 0.2 ms up to the busy timeout, instead of SQLite's busy
  handler, whose sleeps (1, 2, 5, 10 ... ms) overshoot sub-millisecond commits
  (``experiments/serve_benchmark.md``).
- **Connections:** one per process and thread, opened on first use (a forked
  worker or a pickled copy reconnects instead of sharing a socket-like handle).
- **Head fingerprint:** residuals only mean something for the head they were
  learned against; :meth:`SQLiteStore.bind_head` records it and resets (or
  refuses) state learned against another head.

Load the item catalog from a folder of query files with
``python -m streamml.stores.sqlite load data/queries --db state.db``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Hashable, Iterator, Mapping
from pathlib import Path

import numpy as np

from streamml.stores.base import Field, Store
from streamml.stores.codec import Keys, RecordCodec, check_unique, encode_key, encode_keys, to_json
from streamml.stores.errors import HeadMismatch, StoreUnavailable
from streamml.stores.events import Claim, read_catalog

__all__ = ["SQLiteDB", "Checkpointer", "SQLiteStore", "SQLiteEventLog", "SQLiteItems", "load_items", "main"]

_CHUNK = 500  # keys per statement: well under SQLite's limit on bound variables
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class SQLiteDB:
    """One SQLite file in WAL mode, with a connection per process and thread.

    Parameters
    ----------
    path
        The database file (created if absent).
    synchronous
        ``"NORMAL"`` (survives a killed process) or ``"FULL"`` (also survives an OS
        crash, one fsync per commit); see the module docstring.
    busy_timeout_s
        How long a writer waits for another process's write lock before failing
        with :class:`StoreUnavailable`.
    page_size
        Bytes per page of a new file (ignored for an existing one).
    autocheckpoint
        WAL pages after which a commit also checkpoints (SQLite's ``wal_autocheckpoint``);
        0: never in a commit, leave it to a :class:`Checkpointer` (or :meth:`checkpoint`).
    """

    def __init__(self, path: str | Path, synchronous: str = "NORMAL", busy_timeout_s: float = 10.0, page_size: int = 16384,
                 autocheckpoint: int = 1000):
        if synchronous.upper() not in ("NORMAL", "FULL"):
            raise ValueError(f"synchronous must be 'NORMAL' or 'FULL', got {synchronous!r}")
        self.path = Path(path)
        self.synchronous = synchronous.upper()
        self.busy_timeout_s = float(busy_timeout_s)
        self.page_size = int(page_size)
        self.autocheckpoint = int(autocheckpoint)
        if self.autocheckpoint < 0:
            raise ValueError(f"autocheckpoint must be >= 0 pages, got {autocheckpoint}")
        self._local = threading.local()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.conn  # create the file and set its page size and journal mode now

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k != "_local"}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._local = threading.local()

    def __repr__(self) -> str:
        return f"SQLiteDB({str(self.path)!r})"

    @property
    def conn(self) -> sqlite3.Connection:
        local = self._local
        if getattr(local, "pid", None) != os.getpid():
            # autocommit mode: transactions are opened explicitly (BEGIN IMMEDIATE)
            conn = sqlite3.connect(self.path, timeout=self.busy_timeout_s, isolation_level=None, check_same_thread=True)
            conn.execute(f"PRAGMA page_size={self.page_size}")  # only takes effect on an empty file
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute(f"PRAGMA synchronous={self.synchronous}")
            conn.execute(f"PRAGMA wal_autocheckpoint={self.autocheckpoint}")
            local.conn, local.pid = conn, os.getpid()
        return local.conn

    def close(self) -> None:
        """Close this thread's connection (the next use opens a new one)."""
        conn = getattr(self._local, "conn", None)
        if conn is not None and self._local.pid == os.getpid():
            conn.close()
        self._local = threading.local()

    @contextlib.contextmanager
    def transaction(self, write: bool = True) -> Iterator[sqlite3.Connection]:
        """``BEGIN IMMEDIATE`` (write) or ``BEGIN`` (a consistent read) ... ``COMMIT``;
        rolls back on any exception. A lock held past the busy timeout raises
        :class:`StoreUnavailable`."""
        conn = self.conn
        try:
            if write:
                self._begin_immediate(conn)
            else:
                conn.execute("BEGIN")
        except sqlite3.OperationalError as e:
            raise StoreUnavailable(f"SQLite {self.path}: {e}") from e
        try:
            yield conn
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        else:
            try:
                conn.execute("COMMIT")
            except sqlite3.OperationalError as e:
                conn.execute("ROLLBACK")
                raise StoreUnavailable(f"SQLite {self.path}: {e}") from e

    def _begin_immediate(self, conn: sqlite3.Connection) -> None:
        """``BEGIN IMMEDIATE``, retried every 0.2 ms (later 1 ms) while another connection
        holds the write lock, up to the busy timeout. SQLite's own busy handler sleeps 1, 2,
        5, 10, 15, 20, 25 ms ... between tries, so a writer queued behind a 0.3 ms commit of
        another worker would wait 1-8 ms, and tens of ms behind a slow one."""
        conn.execute("PRAGMA busy_timeout=0")
        try:
            deadline = time.monotonic() + self.busy_timeout_s
            tries = 0
            while True:
                try:
                    conn.execute("BEGIN IMMEDIATE")
                    return
                except sqlite3.OperationalError as e:
                    if conn.in_transaction or "locked" not in str(e) or time.monotonic() > deadline:
                        raise
                tries += 1
                time.sleep(0.0002 if tries < 50 else 0.001)
        finally:
            conn.execute(f"PRAGMA busy_timeout={int(self.busy_timeout_s * 1000)}")

    def checkpoint(self, mode: str = "PASSIVE") -> tuple[int, int]:
        """A checkpoint on this thread's connection. ``PASSIVE`` copies what it can of the WAL
        into the database without waiting for readers or writers; ``RESTART`` also waits (busy
        timeout) for a moment without writers and then starts the WAL over from its beginning.
        Returns (WAL frames, frames checkpointed); (-1, -1) if it could not run."""
        if mode not in ("PASSIVE", "RESTART"):
            raise ValueError(f"mode must be 'PASSIVE' or 'RESTART', got {mode!r}")
        try:
            busy, frames, done = self.conn.execute(f"PRAGMA wal_checkpoint({mode})").fetchone()
        except sqlite3.OperationalError:  # "database is locked": another process's checkpoint runs
            return -1, -1
        return (-1, -1) if busy else (frames, done)

    def meta_get(self, conn: sqlite3.Connection, key: str) -> str | None:
        row = conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else row[0]

    def meta_set(self, conn: sqlite3.Connection, key: str, value: str) -> None:
        conn.execute("INSERT INTO meta(key, value) VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value = excluded.value", (key, value))

    def ensure_meta(self) -> None:
        self.conn.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")


class Checkpointer:
    """A daemon thread that checkpoints ``db`` every ``interval_s`` seconds, on its own
    connection, until :meth:`stop`. Use it with ``SQLiteDB(..., autocheckpoint=0)``, so no
    request pays for a checkpoint; each process that writes may run one (a checkpoint
    already running elsewhere is skipped).

    Each tick is a ``PASSIVE`` checkpoint. Under steady writes that alone never lets the
    WAL start over (new commits land while it copies), so once the WAL holds more than
    ``restart_frames`` frames a ``RESTART`` checkpoint follows the passive one: it waits for
    a gap between commits, copies the few frames committed since, and starts the WAL over;
    writers wait for it about as long as for a few other commits.
    """

    def __init__(self, db: SQLiteDB, interval_s: float = 0.1, restart_frames: int = 1000):
        if interval_s <= 0:
            raise ValueError(f"interval_s must be positive, got {interval_s}")
        self.db, self.interval_s, self.restart_frames = db, float(interval_s), int(restart_frames)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"checkpoint {db.path.name}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        conn = self.db.conn  # this thread's own connection
        try:
            while not self._stop.wait(self.interval_s):
                frames, done = self.db.checkpoint()
                if frames > self.restart_frames:
                    self.db.checkpoint("RESTART")
        finally:
            conn.close()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not threading.current_thread():
            self._thread.join(10)


def _client_id(user: str, client_event_id: str) -> str:
    """The ``client_events`` key: ids are per user (``["alice","c1"]``)."""
    return encode_key((str(user), str(client_event_id)))


def _db(db: SQLiteDB | str | Path, **kwargs) -> SQLiteDB:
    return db if isinstance(db, SQLiteDB) else SQLiteDB(db, **kwargs)


def _chunks(seq: list, size: int = _CHUNK):
    for i in range(0, len(seq), size):
        yield seq[i : i + size]


class SQLiteStore(Store):
    """Per-key state in a SQLite table, shared by every process that opens the file.

    Parameters
    ----------
    schema
        Field name -> :class:`~streamml.stores.Field`.
    path
        A database file, or a :class:`SQLiteDB` shared with the event log and items.
    table
        The state table's name (one file can hold several stores).
    on_schema_mismatch
        ``"error"`` (default): opening a table written with another schema raises
        ``ValueError``. ``"reset"``: drop its state and adopt the new schema.
    **db_kwargs
        Passed to :class:`SQLiteDB` when ``path`` is a path (``synchronous``, ...).

    Examples
    --------
    >>> import tempfile, pathlib
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "state.db"
    >>> store = SQLiteStore({"r": Field((2,), "float16"), "n": Field((), "int32", fill=-1)}, path)
    >>> store.get_many([(7, "q")])["n"]          # never written: fill value
    array([-1], dtype=int32)
    >>> store.update_many([(7, "q")], lambda s: {"n": s["n"] + 2})
    >>> SQLiteStore(store.schema, path).get_many([(7, "q")])["n"]   # another handle, same file
    array([1], dtype=int32)
    """

    def __init__(self, schema: Mapping[str, Field], path: SQLiteDB | str | Path, table: str = "state",
                 on_schema_mismatch: str = "error", **db_kwargs):
        if not _NAME.match(table) or table in ("meta", "events", "claims", "client_events", "items"):
            raise ValueError(f"table must be an identifier other than the log and catalog tables, got {table!r}")
        if on_schema_mismatch not in ("error", "reset"):
            raise ValueError(f"on_schema_mismatch must be 'error' or 'reset', got {on_schema_mismatch!r}")
        self.codec = RecordCodec(schema)
        self.schema: dict[str, Field] = self.codec.schema
        self.db = _db(path, **db_kwargs)
        self.table = table
        self.db.ensure_meta()
        with self.db.transaction() as conn:
            conn.execute(
                f"CREATE TABLE IF NOT EXISTS {table} (id INTEGER PRIMARY KEY, key TEXT NOT NULL UNIQUE, value BLOB NOT NULL)"
            )
            stored = self.db.meta_get(conn, f"{table}.schema")
            if stored is not None and stored != self.codec.signature:
                if on_schema_mismatch == "error":
                    raise ValueError(
                        f"{self.db.path} table {table!r} holds records of schema {stored}, not {self.codec.signature}; "
                        "pass on_schema_mismatch='reset' to drop that state, or use another table"
                    )
                conn.execute(f"DELETE FROM {table}")
            self.db.meta_set(conn, f"{table}.schema", self.codec.signature)

    def __repr__(self) -> str:
        return f"SQLiteStore({self.db.path}, table={self.table!r}, fields={list(self.schema)})"

    # ---- reads
    def _read(self, conn: sqlite3.Connection, enc: list[str]) -> list[bytes | None]:
        found: dict[str, bytes] = {}
        for part in _chunks(list(dict.fromkeys(enc))):
            q = f"SELECT key, value FROM {self.table} WHERE key IN ({','.join('?' * len(part))})"
            found.update(conn.execute(q, part).fetchall())
        return [found.get(k) for k in enc]

    def get_many(self, keys: Keys) -> dict[str, np.ndarray]:
        enc = encode_keys(keys, "get_many")
        with self.db.transaction(write=False) as conn:
            return self.codec.unpack(self._read(conn, enc))

    def __contains__(self, key: Hashable) -> bool:
        q = f"SELECT 1 FROM {self.table} WHERE key = ?"
        return self.db.conn.execute(q, (encode_key(key),)).fetchone() is not None

    def __len__(self) -> int:
        return self.db.conn.execute(f"SELECT COUNT(*) FROM {self.table}").fetchone()[0]

    # ---- writes
    def _write(self, conn: sqlite3.Connection, enc: list[str], blobs: list[bytes]) -> None:
        conn.executemany(
            f"INSERT INTO {self.table}(key, value) VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
            zip(enc, blobs),
        )

    def put_many(self, keys: Keys, values: Mapping[str, np.ndarray]) -> None:
        enc = encode_keys(keys, "put_many")
        check_unique(enc, "put_many")
        vals = self.codec.check_values(values, len(enc))
        if not enc:
            return
        with self.db.transaction() as conn:
            base = None if len(vals) == len(self.schema) else self._read(conn, enc)
            self._write(conn, enc, self.codec.pack(vals, len(enc), base))

    def update_many(self, keys: Keys, fn: Callable[[dict[str, np.ndarray]], Mapping[str, np.ndarray]]) -> None:
        """``put_many(keys, fn(get_many(keys)))`` in one write transaction: atomic per
        key across processes; if ``fn`` raises, nothing is written."""
        enc = encode_keys(keys, "update_many")
        check_unique(enc, "update_many")
        with self.db.transaction() as conn:
            base = self._read(conn, enc)
            vals = self.codec.check_values(fn(self.codec.unpack(base)), len(enc))
            if enc:
                self._write(conn, enc, self.codec.pack(vals, len(enc), base))

    def update_claimed(self, keys: Keys, fn: Callable[[dict[str, np.ndarray]], Mapping[str, np.ndarray]],
                       claim: Claim, events: SQLiteEventLog) -> bool:
        """:meth:`update_many` in the transaction that wins ``claim`` in ``events`` (a log of the
        same file): both commit or neither, so a process killed in between leaves no claim
        without its update. False, and nothing written, if the claim was won before; ``KeyError``
        if a reward's event is unknown or expired."""
        if events.db.path != self.db.path:
            raise ValueError(f"the claim's event log ({events.db.path}) is not in the store's file ({self.db.path})")
        enc = encode_keys(keys, "update_claimed")
        check_unique(enc, "update_claimed")
        with self.db.transaction() as conn:
            if not events.claim_in(conn, claim):
                return False
            base = self._read(conn, enc)
            vals = self.codec.check_values(fn(self.codec.unpack(base)), len(enc))
            if enc:
                self._write(conn, enc, self.codec.pack(vals, len(enc), base))
        return True

    def delete_many(self, keys: Keys) -> None:
        enc = list(dict.fromkeys(encode_keys(keys, "delete_many")))
        if not enc:
            return
        with self.db.transaction() as conn:
            for part in _chunks(enc):
                conn.execute(f"DELETE FROM {self.table} WHERE key IN ({','.join('?' * len(part))})", part)

    def clear(self) -> None:
        """Delete every key."""
        with self.db.transaction() as conn:
            conn.execute(f"DELETE FROM {self.table}")

    # ---- head fingerprint
    @property
    def head_fingerprint(self) -> str | None:
        """Fingerprint of the head the stored state was learned against (None: unbound)."""
        return self.db.meta_get(self.db.conn, f"{self.table}.head_fingerprint")

    def bind_head(self, fingerprint: str, on_mismatch: str = "reset") -> str:
        """Declare the head this state is learned against, before serving with it.

        If the store is bound to another head: ``"reset"`` deletes all state (the
        residuals do not transfer), ``"error"`` raises :class:`HeadMismatch`, and
        ``"keep"`` is the explicit migration that keeps the residuals as they are.
        Returns what happened: ``"bound"`` (first binding), ``"unchanged"``,
        ``"reset"`` or ``"kept"``.
        """
        if on_mismatch not in ("reset", "error", "keep"):
            raise ValueError(f"on_mismatch must be 'reset', 'error' or 'keep', got {on_mismatch!r}")
        if not isinstance(fingerprint, str) or not fingerprint:
            raise ValueError(f"fingerprint must be a non-empty string, got {fingerprint!r}")
        with self.db.transaction() as conn:
            old = self.db.meta_get(conn, f"{self.table}.head_fingerprint")
            if old == fingerprint:
                return "unchanged"
            if old is not None and on_mismatch == "error":
                raise HeadMismatch(
                    f"{self.db.path} table {self.table!r} holds state learned against head {old!r}, not {fingerprint!r}; "
                    "bind with on_mismatch='reset' to drop it or 'keep' to migrate it as is"
                )
            if old is not None and on_mismatch == "reset":
                conn.execute(f"DELETE FROM {self.table}")
            self.db.meta_set(conn, f"{self.table}.head_fingerprint", fingerprint)
            return "bound" if old is None else ("reset" if on_mismatch == "reset" else "kept")


class SQLiteEventLog:
    """Served events, the rewards claimed on them, and client event ids, with expiry.

    ``create`` stores an event's record (user, query, shown items, propensities,
    model version, bucket ...) as JSON, stamped with ``created`` (epoch seconds);
    it is kept ``ttl_s`` seconds. The service judges late rewards by ``created``;
    the TTL only bounds how long events are kept. ``claim`` is first-wins per
    (event, item); ``claim_client_event`` is first-wins per client id until it expires;
    ``release`` and ``release_client_event`` undo a claim whose update then failed.

    Examples
    --------
    >>> import tempfile, pathlib
    >>> log = SQLiteEventLog(pathlib.Path(tempfile.mkdtemp()) / "state.db")
    >>> log.create("e1", {"user": 7, "items": [3, 5]}, ttl_s=60)
    >>> log.get("e1")["items"], log.get("nope")
    ([3, 5], None)
    >>> log.claim("e1", 3), log.claim("e1", 3), log.claim("e1", 5)
    (True, False, True)
    """

    def __init__(self, path: SQLiteDB | str | Path, clock: Callable[[], float] = time.time, **db_kwargs):
        self.db = _db(path, **db_kwargs)
        self.clock = clock
        self._creates = 0
        self.db.ensure_meta()
        with self.db.transaction() as conn:
            conn.execute(
                "CREATE TABLE IF NOT EXISTS events (event_id TEXT PRIMARY KEY, created REAL NOT NULL, "
                "expires REAL NOT NULL, record TEXT NOT NULL)"
            )
            conn.execute("CREATE INDEX IF NOT EXISTS events_expires ON events(expires)")
            conn.execute(
                "CREATE TABLE IF NOT EXISTS claims (event_id TEXT NOT NULL, item TEXT NOT NULL, "
                "PRIMARY KEY (event_id, item)) WITHOUT ROWID"
            )
            conn.execute("CREATE TABLE IF NOT EXISTS client_events (id TEXT PRIMARY KEY, expires REAL NOT NULL) WITHOUT ROWID")
            conn.execute(
                "CREATE TABLE IF NOT EXISTS rejected (user TEXT NOT NULL, query TEXT NOT NULL, item INTEGER NOT NULL, "
                "expires REAL NOT NULL, PRIMARY KEY (user, query, item)) WITHOUT ROWID"
            )

    def new_event_id(self, user: str) -> str:
        """A fresh random event id (32 hex digits)."""
        return uuid.uuid4().hex

    def create(self, event_id: str, record: Mapping, ttl_s: float) -> None:
        """Store a new event; an existing, unexpired ``event_id`` is a ``ValueError``."""
        if ttl_s <= 0:
            raise ValueError(f"ttl_s must be positive, got {ttl_s}")
        now = self.clock()
        rec = dict(record)
        rec.setdefault("created", now)
        text = to_json(rec)
        self._creates += 1
        if self._creates % 1000 == 0:
            self.purge()
        with self.db.transaction() as conn:
            row = conn.execute("SELECT expires FROM events WHERE event_id = ?", (event_id,)).fetchone()
            if row is not None and row[0] > now:
                raise ValueError(f"event {event_id!r} already exists")
            if row is not None:
                conn.execute("DELETE FROM claims WHERE event_id = ?", (event_id,))
            conn.execute(
                "INSERT OR REPLACE INTO events(event_id, created, expires, record) VALUES (?, ?, ?, ?)",
                (event_id, rec["created"], now + ttl_s, text),
            )

    def get(self, event_id: str) -> dict | None:
        """The event's record (with ``created``), or None if unknown or expired."""
        row = self.db.conn.execute("SELECT expires, record FROM events WHERE event_id = ?", (event_id,)).fetchone()
        if row is None or row[0] <= self.clock():
            return None
        return json.loads(row[1])

    def claim_in(self, conn: sqlite3.Connection, claim: Claim) -> bool:
        """Win ``claim`` inside the caller's write transaction on ``conn``: the one place of
        the claim SQL (the service runs it in the transaction of the state update it guards).
        Raises ``KeyError`` if a reward's event is unknown or expired."""
        now = self.clock()
        if claim.kind == "event":
            row = conn.execute("SELECT expires FROM events WHERE event_id = ?", (claim.ident,)).fetchone()
            if row is None or row[0] <= now:
                raise KeyError(f"unknown or expired event {claim.ident!r}")
            return conn.execute("INSERT OR IGNORE INTO claims(event_id, item) VALUES (?, ?)",
                                (claim.ident, encode_key(claim.item, "claim item"))).rowcount == 1
        return conn.execute(
            "INSERT INTO client_events(id, expires) VALUES (?, ?) "
            "ON CONFLICT(id) DO UPDATE SET expires = excluded.expires WHERE client_events.expires <= ?",
            (_client_id(claim.user, claim.ident), now + claim.ttl_s, now),
        ).rowcount == 1

    def claim(self, event_id: str, item: Hashable) -> bool:
        """True exactly once per (event, item): for the first reward of that item.

        Raises ``KeyError`` if the event is unknown or expired."""
        with self.db.transaction() as conn:
            return self.claim_in(conn, Claim("event", "", event_id, item))

    def release(self, event_id: str, item: Hashable) -> None:
        """Undo a claim whose update could not be applied, so a retried reward counts."""
        with self.db.transaction() as conn:
            conn.execute("DELETE FROM claims WHERE event_id = ? AND item = ?", (event_id, encode_key(item, "release item")))

    def release_client_event(self, user: str, client_event_id: str) -> None:
        """Undo :meth:`claim_client_event` (its update could not be applied)."""
        with self.db.transaction() as conn:
            conn.execute("DELETE FROM client_events WHERE id = ?", (_client_id(user, client_event_id),))

    def claim_client_event(self, user: str, client_event_id: str, ttl_s: float) -> bool:
        """True the first time ``user`` sends ``client_event_id`` within ``ttl_s`` seconds
        (idempotent plain feedback); False for a repeat. Ids are per user."""
        if ttl_s <= 0:
            raise ValueError(f"ttl_s must be positive, got {ttl_s}")
        with self.db.transaction() as conn:
            return self.claim_in(conn, Claim("client", str(user), str(client_event_id), ttl_s=ttl_s))

    def note_rejected(self, user: str, query: str, item: int, ttl_s: float) -> None:
        """``user`` rejected catalog ``item`` of ``query``: :meth:`rejected` lists it for ``ttl_s`` seconds."""
        if ttl_s <= 0:
            raise ValueError(f"ttl_s must be positive, got {ttl_s}")
        with self.db.transaction() as conn:
            conn.execute("INSERT INTO rejected(user, query, item, expires) VALUES (?, ?, ?, ?) "
                         "ON CONFLICT(user, query, item) DO UPDATE SET expires = excluded.expires",
                         (str(user), str(query), int(item), self.clock() + ttl_s))

    def rejected(self, user: str, query: str) -> set[int]:
        """The catalog items of ``query`` that ``user`` rejected within their ttl."""
        rows = self.db.conn.execute("SELECT item FROM rejected WHERE user = ? AND query = ? AND expires > ?",
                                    (str(user), str(query), self.clock())).fetchall()
        return {r[0] for r in rows}

    def forget_rejected(self, user: str) -> None:
        with self.db.transaction() as conn:
            conn.execute("DELETE FROM rejected WHERE user = ?", (str(user),))

    def purge(self) -> int:
        """Delete expired events, their claims and expired client ids; returns events deleted."""
        now = self.clock()
        with self.db.transaction() as conn:
            conn.execute("DELETE FROM claims WHERE event_id IN (SELECT event_id FROM events WHERE expires <= ?)", (now,))
            n = conn.execute("DELETE FROM events WHERE expires <= ?", (now,)).rowcount
            conn.execute("DELETE FROM client_events WHERE expires <= ?", (now,))
            conn.execute("DELETE FROM rejected WHERE expires <= ?", (now,))
        return n


class SQLiteItems:
    """The item catalog: each query's items with their text and embedding.

    Item ids are the row positions of :func:`streamml.data.load_queries` over the
    folder (the online learner's catalog ids for the same folder); queries are the
    query files' stems.

    Examples
    --------
    >>> import tempfile, pathlib
    >>> items = SQLiteItems(pathlib.Path(tempfile.mkdtemp()) / "state.db")
    >>> items.queries()
    []
    """

    def __init__(self, path: SQLiteDB | str | Path, **db_kwargs):
        self.db = _db(path, **db_kwargs)
        self.db.ensure_meta()
        with self.db.transaction() as conn:
            conn.execute(
                "CREATE TABLE IF NOT EXISTS items (item_id INTEGER PRIMARY KEY, query TEXT NOT NULL, "
                "text TEXT NOT NULL, embedding BLOB NOT NULL)"
            )
            conn.execute("CREATE INDEX IF NOT EXISTS items_query ON items(query, item_id)")

    def load_folder(self, folder: str | Path, embedding_dim: int = 384) -> int:
        """Replace the catalog with the query files of ``folder``; returns the item count."""
        c = read_catalog(folder, embedding_dim)
        X = c.X
        rows = zip(c.ids.tolist(), c.queries, c.texts, (x.tobytes() for x in X))
        with self.db.transaction() as conn:
            conn.execute("DELETE FROM items")
            conn.executemany("INSERT INTO items(item_id, query, text, embedding) VALUES (?, ?, ?, ?)", rows)
            self.db.meta_set(conn, "items.fingerprint", c.fingerprint)
            self.db.meta_set(conn, "items.embedding_dim", str(X.shape[1]))
            self.db.meta_set(conn, "items.queries", json.dumps(c.query_ids))
        return len(X)

    @property
    def fingerprint(self) -> str | None:
        """The loaded folder's data fingerprint (:attr:`streamml.data.QueryData.fingerprint`)."""
        return self.db.meta_get(self.db.conn, "items.fingerprint")

    def queries(self) -> list[str]:
        """Query ids, in file order."""
        text = self.db.meta_get(self.db.conn, "items.queries")
        return [] if text is None else json.loads(text)

    def _rows(self, where: str = "", args: tuple = ()):
        rows = self.db.conn.execute(f"SELECT item_id, query, text, embedding FROM items {where} ORDER BY item_id", args).fetchall()
        ids = np.array([r[0] for r in rows], np.int64)
        dim = int(self.db.meta_get(self.db.conn, "items.embedding_dim") or 0)
        X = np.frombuffer(b"".join(r[3] for r in rows), np.float32).reshape(len(rows), dim).copy()
        return ids, [r[1] for r in rows], [r[2] for r in rows], X

    def items(self, query: str) -> tuple[np.ndarray, list[str], np.ndarray]:
        """``(ids (n,), texts, X (n, d) float32)`` of one query; ``KeyError`` if unknown."""
        ids, _, texts, X = self._rows("WHERE query = ?", (str(query),))
        if not len(ids):
            raise KeyError(f"unknown query {query!r}; the catalog has {self.queries()}")
        return ids, texts, X

    def all(self) -> tuple[np.ndarray, list[str], list[str], np.ndarray]:
        """``(ids, query of each item, texts, X)`` of the whole catalog (to build a learner)."""
        return self._rows()


def load_items(db: SQLiteDB | str | Path, folder: str | Path, embedding_dim: int = 384) -> int:
    """Load a folder of query files into the catalog of ``db``; returns the item count."""
    return SQLiteItems(db).load_folder(folder, embedding_dim=embedding_dim)


def main(argv: list[str] | None = None) -> None:
    """``python -m streamml.stores.sqlite load FOLDER --db state.db``."""
    parser = argparse.ArgumentParser(prog="python -m streamml.stores.sqlite", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    load = sub.add_parser("load", help="load a folder of query JSON files into the item catalog")
    load.add_argument("folder")
    load.add_argument("--db", default="state.db")
    load.add_argument("--embedding-dim", type=int, default=384)
    args = parser.parse_args(argv)
    n = load_items(args.db, args.folder, args.embedding_dim)
    print(f"loaded {n} items of {len(SQLiteItems(args.db).queries())} queries into {args.db}")


if __name__ == "__main__":
    main()
