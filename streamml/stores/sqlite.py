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
  pages stay full; 16 KiB pages fit several residual records where 4 KiB pages
  waste most of each page (``experiments/serve_stores_figures.md``).
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
  that crossed the mark. At a few hundred requests per second that is a checkpoint of
  megabytes every second or so (``experiments/serve_stores_figures.md``), stalling the
  request that pays for it and those queued behind it. :class:`Checkpointer` runs them
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

The file's parts each have a module: :mod:`~streamml.stores.sqlite_db` (connection,
transactions, checkpointer), this one (the state store), :mod:`~streamml.stores.sqlite_events`
(the event log) and :mod:`~streamml.stores.sqlite_items` (the catalog and the CLI).
"""

from __future__ import annotations

import re
import sqlite3
from collections.abc import Callable, Hashable, Mapping
from pathlib import Path

import numpy as np

from streamml.stores.base import Field, Store
from streamml.stores.codec import Keys, RecordCodec, check_unique, encode_key, encode_keys
from streamml.stores.errors import HeadMismatch
from streamml.stores.events import Claim
from streamml.stores.sqlite_db import Checkpointer, SQLiteDB, chunks, open_db
from streamml.stores.sqlite_events import SQLiteEventLog
from streamml.stores.sqlite_items import SQLiteItems, load_items, main

__all__ = ["SQLiteDB", "Checkpointer", "SQLiteStore", "SQLiteEventLog", "SQLiteItems", "load_items", "main"]

_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


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
        self.db = open_db(path, **db_kwargs)
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
        for part in chunks(list(dict.fromkeys(enc))):
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
            for part in chunks(enc):
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


if __name__ == "__main__":
    main()
